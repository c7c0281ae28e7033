"""Where each term's formula comes from: one line per term, shown with every estimate."""

from __future__ import annotations

SOURCES: dict[str, str] = {
    "weights": "parameters x bytes of their dtype, per module (app/estimator/params.py, exact per transformers 5.24 modeling code)",
    "quantization_constants": "bitsandbytes: fp32 absmax per 64 weights (0.5 bit/param), double quant 8/64 + 32/(64*256) = 0.127 bit/param (QLoRA paper arXiv:2305.14314 s.3); LLM.int8 row scales; GPTQ/AWQ fp16 scales and packed zeros per group",
    "lora_adapters": "LoRA: r x (in + out) per adapted module in the adapter dtype (LoRA paper arXiv:2106.09685; PEFT autocasts adapters to fp32); other PEFT methods: their vectors, prompts or norms in fp32 (app/estimator/peft_methods.py)",
    "master_weights": "DeepSpeed ZeRO keeps fp32 masters of 16-bit weights: 4 bytes/param (ZeRO paper arXiv:1910.02054 s.3.1)",
    "gradients": "trainable parameters x bytes of their dtype; sharded by ZeRO-2/3 and FSDP",
    "optimizer_states": "torch optimizers: states in the parameter dtype (torch/optim/adamw.py); bitsandbytes 32-bit: fp32; 8-bit: 1 byte + fp32 absmax per 256 (bitsandbytes/optim/optimizer.py)",
    "communication_buffers": "DDP gradient buckets (a gradient-sized copy) or ZeRO reduce buckets (hidden^2 elements)",
    "activations": "tensors autograd saves per block (app/estimator/activations.py, from transformers 5.24 modeling code); with gradient checkpointing one hidden state per block plus one block recomputed",
    "logits_and_loss": "logits in the compute dtype, their fp32 upcast and log_softmax output, and their gradients (transformers/loss/loss_utils.py ForCausalLMLoss)",
    "autocast_weight_cache": "torch.autocast caches 16-bit casts of fp32 weights for the forward pass (aten/src/ATen/autocast_mode.cpp)",
    "transient": "bitsandbytes dequantized weight (bitsandbytes/autograd/_functions.py), ZeRO-3/FSDP gathered blocks, optimizer step temporaries (foreach AdamW: one parameter-sized list)",
    "rotary_caches": "transformers < 4.41 (llama), < 4.42 (mistral), < 4.45 (qwen2, qwen2_moe): every attention layer's rotary embedding registers cos and sin tables of max_position_embeddings x head_dim (modeling_<family>.py _set_cos_sin_cache)",
    "kv_cache": "2 x layers x kv_heads x head_dim x tokens x bytes (transformers DynamicCache)",
    "cublas_workspace": "cuBLAS + cuBLASLt workspaces per handle (aten/src/ATen/cuda/CublasHandlePool.cpp)",
    "allocator_reserve": "caching allocator segments and fragmentation (c10/cuda/CUDACachingAllocator.cpp); fraction of transient bytes, calibrated",
    "nccl_buffers": "NCCL's per-channel, per-connection protocol buffers outside PyTorch's allocator (NCCL src/init.cc): 32 channels x 2 ring connections x (4 MiB + 512 KiB + 4.69 MiB)",
    "cuda_context": "CUDA context and loaded kernels outside PyTorch's allocator (nvidia-smi minus max_memory_reserved)",
}
