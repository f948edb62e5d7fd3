"""Methods mixed into vLLM's workers (engine argument `worker_extension_cls`) that the vllm
rollout backend calls by name with `LLM.collective_rpc`. Imported by vLLM inside its worker
processes only.

`gradalign_reload_weights(weights_path)`: vLLM's in-place reload (`reload_weights`) followed by
`refresh_tied_weights`. vLLM 0.32's reload loads no checkpoint tensor into a layer whose weight
is another layer's parameter (the lm_head of a model with tied word embeddings, e.g. Qwen2.5-0.5B
and the tiny model): the shared tensor gets the new values, but the lm_head's kernel-format
weights derived from it at load time are put back as they were. On CPU those are the packed GEMM
weights of the output projection, so without the refresh the model kept computing logits with
the previous checkpoint's embeddings (tests/test_vllm_rollout.py compares every output with the
hf generation on the new checkpoint).
"""

from __future__ import annotations


def refresh_tied_weights(model) -> list[str]:
    """Re-derive the kernel-format weights of the unquantized layers whose weight is a parameter
    of an earlier layer (tied); return their names."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    owner: dict[int, str] = {}
    refreshed = []
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) in owner and owner[id(param)] != name:
                quant = getattr(module, "quant_method", None)
                if isinstance(quant, UnquantizedEmbeddingMethod) and param is getattr(module, "weight", None):
                    quant.process_weights_after_loading(module)
                    refreshed.append(name)
            else:
                owner[id(param)] = name
    return refreshed


class GradAlignWorkerExtension:
    """Mixed into vLLM's Worker class in each worker process."""

    def gradalign_reload_weights(self, weights_path: str) -> list[str]:
        self.reload_weights(weights_path=weights_path)
        return refresh_tied_weights(self.model_runner.get_model())
