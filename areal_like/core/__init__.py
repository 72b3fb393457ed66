"""The Ray-free core shared by both meshes: records that cross actor boundaries (``types``), prompt
files (``data``), model and tokenizer building and loading (``models``, ``tokenizer``), weight
digests (``digest``), and parameter reallocation (``realloc``: the plan and its executors).

Layer 2 of 4 (see docs/architecture.md): imports only the standard library, third-party packages
other than Ray, ``datastore`` and itself. ``rollout``, ``trainer`` and the top of ``areal_like``
build on it.
"""
