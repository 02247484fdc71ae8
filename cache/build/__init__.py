"""`distill cache`: the job (`CacheJob`), who embeds which rows, one decode per image for every teacher, stored
views, and the commit of each chunk. Reads through `cache.sources` and writes through `cache.store`."""
