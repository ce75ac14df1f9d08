"""Scale-out backend: N stateless API nodes and M GPU workers sharing Redis (>= 7.0) or Valkey (>= 7.2).

``redis_engine.RedisEngine`` (API role) and ``redis_worker.RedisWorker`` (worker role) implement the
same queue / job store / event interfaces as the single-node default; ``server.bootstrap`` wires them
into the app for each role. See docs/scale-out.md.
"""
