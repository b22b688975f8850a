"""The parts of a shard build, one job a module; `cxrdist.data.shard.build_shards` composes them.

- options: ShardOptions, what a build is asked for, checked.
- splits: which split each group lands in, and the shards each split fills.
- lock: one build (or cache-latents) per folder.
- layout: where the builder's files sit in a shard set (`.parts/`), and its temporary names.
- resume: whether the folder may take this build, and which shards an interrupted one leaves usable.
- worker: one record -> one encoded sample (or its reject), in a process pool.
- writer: samples -> shard tars and their stats, then index.json and rejects.jsonl.
- outcome: whether the result is usable (the reject limit, empty splits), and undoing a rejected build.
"""
