"""Worker side: executes step plans on one device; decides nothing.

    worker.py           the process: ZMQ DEALER loop, torch.distributed setup, clean exit
    model_runner.py     request state, one flat forward per step, sampling rows
    context.py          per-step attention metadata (positions, slots, block tables, masks)
    attention.py        paged KV cache write + SDPA over gathered blocks; CPU fp32/bf16: native
    native.py, csrc/    C kernels built on first use (paged attention, fp32 and bf16 GEMMs,
                        layer ops, a whole decoder layer in one call), via ctypes
    cpu_gemm.py         CPU linears on prepacked weights with fused epilogues (native or oneDNN)
    sampler.py          greedy / temperature / top-k / top-p / min-p, penalties, logprobs, seeds
    loader.py           HF directory -> model with this rank's weight shards
    models/             decoder definitions, the architecture registry, and the CPU path
                        that runs each decoder layer as one native call
    parallel_state.py, linear.py, embed_head.py, layernorm.py, rotary_embedding.py: layers
"""
