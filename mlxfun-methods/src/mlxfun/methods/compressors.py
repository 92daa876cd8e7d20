"""The built-in compressors as the plugin registers them: a name, a description and ``compress``.

``mlxfun plugins`` lists them without importing ``prune`` or ``ream`` (numpy, and through them
the checkpoint code): ``compress`` imports its implementation when it runs.
"""

import attrs


@attrs.define(frozen=True)
class PruneCompressor:
    name: str = "prune"
    description: str = (
        "remove the experts a selector picks from statistics: slice routers, correction biases "
        "and expert tensors shard by shard; non-uniform results ship a model_file"
    )

    def compress(self, request) -> dict:
        from .prune import PruneRequest, prune

        if isinstance(request, dict):
            request = PruneRequest(**request)
        return prune(request)


@attrs.define(frozen=True)
class ReamCompressor:
    name: str = "ream"
    description: str = (
        "REAM: merge every expert into the experts a selector keeps (output + router "
        "similarity, neuron alignment, saliency-weighted average); needs SciPy"
    )

    def compress(self, request) -> dict:
        from .ream import MergeRequest, merge

        if isinstance(request, dict):
            request = MergeRequest(**request)
        return merge(request)


COMPRESSORS = [PruneCompressor(), ReamCompressor()]
