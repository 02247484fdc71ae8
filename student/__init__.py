"""The BiomedCLIP-architecture student: presets, build, projection heads, freezing, export and load."""
