"""An output as it stands: its committed rows and their view, what is done, its
shard markers and run records, and compaction."""
