"""DoRA's forward transient: the weight norm each DoRA layer recomputes on every call.

peft/tuners/lora/dora.py ``DoraLinearLayer.forward`` (peft 0.21) builds, per targeted linear layer
and call, the dense LoRA product and the norm of the updated weight:

- ``get_lora_weight``: ``x_eye = eye(in, dtype=lora_A dtype)``, ``lora_B(lora_A(x_eye)).T`` (under
  autocast lora_A keeps a 16-bit copy of ``x_eye``, which the graph holds while the product lives;
  the first peak is here, with ``x_eye``, its copy and the product all alive);
- ``lora_weight.to(x.dtype)``: a copy when the product is in another dtype;
- ``dequantize_module_weight(base_layer).to(x.dtype)``: the base weight, dequantized (bitsandbytes)
  or cast; the parameter itself when it already has x's dtype;
- ``get_weight_norm``: ``weight + scaling * lora_weight``: the scaled product and the sum.

The second peak is at that sum. All of these are freed when the layer returns (only the detached norm survives, activations.py
``_dora``), so they are a transient of one layer at a time, in the forward pass and again in the
recomputation under gradient checkpointing. The largest layer sets it.
"""

from __future__ import annotations

from app.estimator.model import ResolvedModel
from app.estimator.params import ModuleKind
from app.estimator.setup import Precision, Setup, lora_casts_input
from app.units import dtype_bytes
from app.workload import Workload


def dora_transient_bytes(model: ResolvedModel, setup: Setup, workload: Workload) -> int:
    """The largest DoRA layer's transient bytes during its forward call (0 without DoRA)."""
    lora = workload.lora
    if lora is None or not lora.use_dora or not setup.lora_targets:
        return 0
    adapter = int(dtype_bytes(lora.adapter_dtype))
    compute = int(dtype_bytes(setup.compute_dtype))
    autocast = setup.autocast is not None
    x_size = adapter if lora_casts_input(setup) else int(dtype_bytes(setup.residual_dtype))
    product = compute if autocast else adapter  # lora_B(lora_A(eye)): autocast runs it in 16 bits
    weight_is_parameter = setup.precision is not Precision.quantized and int(dtype_bytes(setup.weight_dtype)) == x_size
    largest = 0
    for module in model.modules:
        if module.kind is not ModuleKind.linear or module.name not in setup.lora_targets:
            continue
        fan_in, dense = module.in_features, module.in_features * module.out_features
        held_eye = fan_in * fan_in * product  # what lora_A keeps for the product's graph
        eye_copy = fan_in * fan_in * adapter if product != adapter else 0  # x_eye itself, until get_lora_weight returns
        at_product = eye_copy + held_eye + dense * product
        weight = 0 if weight_is_parameter else dense * x_size
        at_sum = held_eye + dense * x_size + weight + 2 * dense * x_size  # lora_weight in x's dtype, weight, scaled, sum
        largest = max(largest, at_product, at_sum)
    return largest // setup.tensor_parallel
