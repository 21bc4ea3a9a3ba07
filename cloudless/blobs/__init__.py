"""Blob storage: content-addressed, replicated chunks and an S3-compatible gateway.

Layers, bottom up (each IO interface has a memory twin):

    chunking.py     FastCDC cuts (~1 MiB average, per bucket), SHA-256 `ChunkDigest`
    chunkstore.py   `ChunkStore`: LocalChunkStore (fan-out files, zstd when it pays,
                    fsync before ack, verify on read, RocksDB index) / MemoryChunkStore
    placement.py    weighted rendezvous hashing over `StorageMember`s, zone spread (pure)
    peers.py        `ChunkPeers` (has/put/get/drop/inventory) / MemoryChunkPeers
    rpc.py          RpcChunkPeers + register_chunk_service: ChunkPeers over transport.rpc
    replication.py  write path (R durable replicas, dedup on the wire), read repair
    antientropy.py  summaries → repair plan (pure) → executor; GC with grace + pins
    manifest.py     Bucket/ObjectManifest/MultipartUpload/AccessKey, `MetadataStore`
                    protocol, LocalMetadataStore (RocksDB or memory)
    catalog.py      BlobCommands + the deterministic Catalog that applies them (what a
                    Raft FSM embeds: apply(decode_command(entry)), export()/restore())
    objects.py      ObjectService: buckets, objects, multipart, access keys
    s3/             the ASGI gateway (SigV4/SigV2, XML, errors) and its TLS serving
    local.py        open_local_blobs(data_dir): the stand-alone store the CLI uses
    oci.py          OciBlobs: image layers/configs under their OCI digest (peer fetch path)

Wiring into the node (what the integrator provides):

    store   = LocalChunkStore(data_dir / "blobs" / "store")
    server  : register_chunk_service(rpc_server, store)
    peers   = RpcChunkPeers(rpc_client, address_of=lambda node_id: (host, port))
    members = lambda: [StorageMember(node_id, zone, capacity, free, power, metered, alive), ...]
              (from gossip metadata; each node reports `store.capacity()`)
    meta    = a Raft-backed MetadataStore: writes propose catalog BlobCommands
              (encode_command), the FSM applies them to its Catalog (errors become
              Rejected results), reads come from the leader's Catalog (ReadIndex)
    service = ObjectService(meta, store, peers, members, node_id=me)
    gateway = S3Gateway(service); serve_gateway(gateway, host, port, certfile, keyfile)
    leader  : AntiEntropyLoop(meta, members, peers).run (trigger() when gossip
              declares a member dead or one joins); every node:
              GarbageCollectionLoop(service.collect_garbage).run
"""
