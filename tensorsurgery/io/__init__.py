"""Reading and writing bytes safely and fast: regular files only, aligned buffers, one shard on
disk, hashing threads."""
