"""Why context parallelism with more than one row a device holds more memory per device at a larger context:
XLA's temporaries of the `tiny` train step (batch 8, so the tokens per device are equal at every context size;
blockwise attention, ring) with `llmjax.models.layers.dense` as it is (it flattens [B, T, D] into [B*T, D] for a
2-D matmul), and with dense as one dot_general over [B, T, D], monkeypatched here (no model file changes), beside
the number of all-gathers whose output holds the whole sequence. Compiled only, on 8 fake CPU devices:

  python -m experiments.long_context.dense_reshape 8192 2,4,8      # a few minutes on 2 CPU cores
"""

import re
import sys

import jax


def main(seq_len: int, contexts: list[int]) -> None:
    jax.config.update("jax_num_cpu_devices", 8)
    from llmjax import config
    from llmjax.estimate import train_step
    from llmjax.models import layers
    from llmjax.sharding import make_mesh

    flattening = layers.dense

    def one_dot(x, w, k=1):
        if isinstance(w, dict):  # LoRA: as it is
            return flattening(x, w, k)
        return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - k, x.ndim)), tuple(range(k))), ((), ())))

    for c in contexts:
        for name, dense in (("reshape", flattening), ("dot_general", one_dot)):
            layers.dense = dense
            cfg = config.base("tiny")
            cfg.batch_size, cfg.seq_len, cfg.eval_every, cfg.model.max_seq_len = 8, seq_len, 0, seq_len
            cfg.mesh.update(fsdp=8 // c, context=c, tensor=1)
            cfg.model.update(attention="blockwise", context_parallel="ring")
            task, batch = train_step(cfg, make_mesh(cfg.mesh))
            step = task.jit_step(jax.tree.map(lambda x: x.sharding, task.abstract))
            compiled = step.lower(task.abstract, batch, *task.frozen).compile()
            gathers = re.findall(rf"= f32\[\d+,{seq_len},[\d,]+\]\S* all-gather\(", compiled.as_text())
            print(f"T={seq_len} context={c} dense={name}: temp "
                  f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:.1f} MiB, all-gathers of whole-sequence "
                  f"activations: {len(gathers)}", flush=True)
    layers.dense = flattening


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8192,
         [int(c) for c in sys.argv[2].split(",")] if len(sys.argv) > 2 else [2, 4, 8])
