"""Turn an exception that reaches the `distill` command line into one line of advice and an exit code.

Why: a researcher whose disk filled up at row 900k of `distill cache` needs "no space left on device: free space
and rerun", not 40 lines of h5py internals; a damaged file must be named, since many commands read several.

Exit codes (the convention of every `distill` command):
    0    success
    1    the environment failed: no space or quota (ENOSPC, EDQUOT), permission (EACCES, EPERM), a read-only file
         system (EROFS), too many open files, the file-size limit (EFBIG), an I/O error, a failed `torch.save`, any
         error whose text carries such an errno (h5py raises RuntimeError "... errno = 28 ..." as well as
         OSError), or one of our own errors raised from one; fix the machine and rerun the same command: work
         already committed is kept
    2    bad input: a wrong argument or missing file, a path that exists already or is a folder, a corrupt or
         truncated file (HDF5 errors carry no errno; safetensors), a refused pickle, a bad config or corpus; fix
         the input
    130  interrupted (Ctrl-C)
An unexpected exception is a bug: its traceback is printed, then one line saying so (exit 3). `distill -v`
re-raises every exception instead, so its traceback is shown.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import sys
from dataclasses import dataclass

from distill.logs import OUR_PACKAGES

ENVIRONMENT = 1
BAD_INPUT = 2
BUG = 3

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", -1)}
_PERMISSION = {errno.EACCES, errno.EPERM}
_TOO_MANY = {errno.EMFILE, errno.ENFILE}
_SYSTEM = {
    errno.EIO,
    errno.EBUSY,
    errno.ESTALE,
    errno.ENODEV,
    errno.ENXIO,
    errno.ETIMEDOUT,
    errno.ENOMEM,
    errno.EAGAIN,
}  # other errnos (EEXIST, ENAMETOOLONG, EINVAL...) are a wrong path: bad input
_ENVIRONMENT_ERRNOS = _NO_SPACE | _PERMISSION | _TOO_MANY | _SYSTEM | {errno.EROFS, errno.EFBIG}
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+),")
_PATH_IN_TEXT = re.compile(r"(?:file)?name = '([^']+)'")
_FAILED_SAVE = ("basic_ios::clear", "PytorchStreamWriter failed", "unexpected pos")


@dataclass(frozen=True)
class Failure:
    """What the CLI prints (one line, after `distill CMD: error: `) and the exit code."""

    message: str
    code: int
    # another process of the job died: this one's process group is broken, and the interpreter's normal shutdown
    # can abort in its threads ("terminate called without an active exception", exit -6 after the error line)
    abandon: bool = False


def exit_code(failure: Failure) -> int:
    """The failure's exit code, to return from main; a broken distributed job (`abandon`) leaves at once instead,
    output flushed, skipping the shutdown that can abort (its DataLoader workers see their parent gone and end)."""
    if failure.abandon:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(failure.code)
    return failure.code


def one_line(text: str) -> str:
    """Several lines joined with ' | ', so the CLI's message stays one line whatever a library raised."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _named_file(e: BaseException, fallback: str | None) -> str | None:
    """The file an OSError is about: its filename, a `name = '...'` in h5py's text, else the command's file."""
    for name in (getattr(e, "filename", None), getattr(e, "filename2", None)):
        if name is not None:
            return str(name)
    found = _PATH_IN_TEXT.search(str(e))
    return found.group(1) if found else fallback


def _errno(e: BaseException) -> int | None:
    """e.errno, or the `errno = N` HDF5 writes only into its message."""
    if (code := getattr(e, "errno", None)) is not None:
        return code
    found = _ERRNO_IN_TEXT.search(str(e))
    return int(found.group(1)) if found else None


def _environment_cause(e: BaseException) -> bool:
    """True when an error raised by our own code wraps a full disk, permission or read-only failure."""
    seen = set()
    cause = e.__cause__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (OSError, RuntimeError)) and _errno(cause) in _ENVIRONMENT_ERRNOS:
            return True
        cause = cause.__cause__
    return False


def _os_error(e: OSError, file: str | None) -> Failure:
    where = f" {file}" if file else ""
    reason = one_line(e.strerror or str(e)) or type(e).__name__
    code = _errno(e)
    if code in _NO_SPACE:
        what = " (disk quota exceeded)" if code == getattr(errno, "EDQUOT", None) else ""
        return Failure(
            f"no space left on device{what} writing{where or ' a file'}: free space (or write "
            f"elsewhere) and rerun the same command; work already committed is kept",
            ENVIRONMENT,
        )
    if code in _PERMISSION:
        return Failure(
            f"permission denied:{where or ' a file'}: check its permissions and owner (or use "
            f"another path), then rerun",
            ENVIRONMENT,
        )
    if code == errno.EFBIG:
        return Failure(
            f"file too large:{where or ' a file'} reached the file-size limit (ulimit -f) or the file "
            f"system's largest file: raise the limit or write elsewhere, then rerun the same command",
            ENVIRONMENT,
        )
    if code == errno.EROFS:
        return Failure(
            f"read-only file system:{where or ' a file'} cannot be written: write to a writable folder, then rerun",
            ENVIRONMENT,
        )
    if code in _TOO_MANY:
        named = f" (opening {e.filename})" if e.filename else ""  # not the fallback: any file may be the one
        return Failure(
            f"too many open files{named}: raise the limit (ulimit -n) or lower --num-workers, then rerun", ENVIRONMENT
        )
    if code == errno.EISDIR:
        return Failure(f"{file or 'a path'} is a directory, not a file: give the file's path", BAD_INPUT)
    if code == errno.ENOTDIR:
        return Failure(f"{file or 'a path'}: a part of this path is a file, not a folder: check the path", BAD_INPUT)
    if isinstance(e, FileNotFoundError):  # ours already name the file; the OS's become "PATH not found"
        own = e.filename is None and e.strerror is None
        return Failure(one_line(str(e)) if own else f"{file} not found: check the path", BAD_INPUT)
    if code is None:  # h5py and friends: a file that is there but is not what it should be
        text = one_line(str(e))
        if file and file not in text:
            return Failure(
                f"{file} cannot be read ({text}): it is truncated, damaged or not the expected "
                f"format; restore it or make it again",
                BAD_INPUT,
            )
        return Failure(text, BAD_INPUT)
    name = errno.errorcode.get(code, str(code))
    if code in _SYSTEM:
        return Failure(
            f"{reason}{':' + where if file else ''} ({name}): the disk, network file system or machine "
            f"failed; check it and rerun the same command",
            ENVIRONMENT,
        )
    if code == errno.EEXIST:
        return Failure(f"{file or 'a path'} already exists: choose another path (or move it away)", BAD_INPUT)
    return Failure(f"{reason}{':' + where if file else ''} ({name}): check the path and rerun", BAD_INPUT)


def describe(e: BaseException, file: str | None = None) -> Failure | None:
    """The one-line message and exit code for an expected failure; None for an unexpected one (a bug).

    `file`: the command's own file (its HDF5 argument), named when the error text carries no path.
    """
    # our own messages, already naming the file
    ours: tuple[type[Exception], ...] = (ValueError,)
    if "cache" in sys.modules:  # else none of cache's errors can have been raised, and importing cache costs torch
        from cache.sources.corpus import BadSampleError  # noqa: PLC0415 (lazy: torch; see the check above)
        from cache.store.schema import CacheError  # noqa: PLC0415 (lazy: torch; see the check above)

        ours = (ValueError, CacheError, BadSampleError)

    if "torch.distributed" in sys.modules:  # another rank of the job died (cache.build.dist.lost_peer)
        from cache.build.dist import lost_peer  # noqa: PLC0415 (lazy: torch kept off a typo's answer)

        if (lost := lost_peer(e)) is not None:
            return Failure(lost, ENVIRONMENT, abandon=True)
    if isinstance(e, OSError):
        if type(e).__module__.split(".")[0] in OUR_PACKAGES:  # ours already name the file and say what to do
            return Failure(one_line(str(e)), ENVIRONMENT if _errno(e) in _ENVIRONMENT_ERRNOS else BAD_INPUT)
        return _os_error(e, _named_file(e, file))
    if isinstance(e, KeyError):
        return Failure(one_line(e.args[0] if e.args else repr(e)), BAD_INPUT)
    if isinstance(e, ours):
        return Failure(one_line(str(e)) or type(e).__name__, ENVIRONMENT if _environment_cause(e) else BAD_INPUT)
    if type(e).__name__ == "SafetensorError":  # the loading sites name the file; this is the last resort
        return Failure(
            f"a safetensors file is damaged (truncated or not safetensors: {one_line(str(e))}): "
            "rerun with -v to see which, then make it again",
            BAD_INPUT,
        )
    if isinstance(e, pickle.UnpicklingError):
        first = (str(e).strip().splitlines() or ["refused"])[0]
        return Failure(
            f"refused to unpickle a file (only plain tensors are loaded: {first}): rerun with -v to "
            "see which; do not load files from untrusted sources",
            BAD_INPUT,
        )
    # h5py's RuntimeError carries the errno in its text: "... errno = 28, ..."
    if isinstance(e, RuntimeError) and (code := _errno(e)) is not None and code in _ENVIRONMENT_ERRNOS:
        return _os_error(OSError(code, os.strerror(code)), _named_file(e, file))
    if isinstance(e, RuntimeError) and any(s in str(e) for s in _FAILED_SAVE):
        return Failure(
            f"writing a file failed ({one_line(str(e))}): the disk is probably full or not writable; "
            "free space and rerun the same command (work already committed is kept)",
            ENVIRONMENT,
        )
    return None
