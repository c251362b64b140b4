"""``DWAWeights``: the stateless DWA weight kernel (scriptable and exportable)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["DWAWeights"]


def _check_pair(loss_t1: Tensor, loss_t2: Tensor) -> None:
    # Metadata only: free at run time and resolved while exporting.
    if loss_t1.shape != loss_t2.shape:
        raise ValueError(
            "DWAWeights: loss_t1 and loss_t2 must have the same shape [..., K], got {} and {}".format(
                loss_t1.shape, loss_t2.shape
            )
        )
    if loss_t1.dtype != loss_t2.dtype:
        raise ValueError(
            "DWAWeights: loss_t1 and loss_t2 must have the same dtype, got {} and {}".format(
                loss_t1.dtype, loss_t2.dtype
            )
        )
    if not loss_t1.is_floating_point():
        raise ValueError("DWAWeights: the losses must be floating point, got {}".format(loss_t1.dtype))
    if loss_t1.dim() == 0:
        raise ValueError("DWAWeights: the losses must have shape [..., K], got a 0-d tensor")


def _raise_invalid_temperature(temperature: Tensor, valid: Tensor) -> None:
    invalid = temperature.masked_select(~valid)
    raise ValueError(
        "DWAWeights: temperature must be finite and > 0 (the paper uses 2.0), got {} ({} of {} values invalid)".format(
            invalid[0].item(), invalid.numel(), temperature.numel()
        )
    )


class DWAWeights(nn.Module):
    r"""Dynamic Weight Average weights from the two previous epoch-average losses.

    .. math::
        r_k = \frac{L_k(t-1)}{L_k(t-2)}, \qquad
        w_k = \frac{K \exp(r_k / T)}{\sum_j \exp(r_j / T)}

    (Liu et al., *End-to-End Multi-Task Learning with Attention*, CVPR 2019).
    Weights are positive and sum to K; a task whose loss fell less gets more
    weight. Computed as ``e / mean(e)`` with ``e = exp((r - max r) / T)``, which
    cannot overflow for any T and needs no K from the shape.

    The module has no parameters, buffers or state, so it works unchanged in
    eager mode, under ``torch.jit.script`` and through ``torch.export`` / ONNX.

    Inputs:
        loss_t1: ``[..., K]`` average losses of epoch t-1 (any leading batch dims).
        loss_t2: ``[..., K]`` average losses of epoch t-2, same shape and dtype.
        temperature: a 0-d tensor, or one that broadcasts against ``[..., 1]``
            (e.g. a per-row ``[N, 1]``). A plain number works in eager mode.

    Returns:
        ``[..., K]`` weights with the shape and dtype of ``loss_t1``, carrying no
        gradient (DWA treats them as constants). float16 and bfloat16 inputs are
        computed in float32.

    Invalid input never gives finite, plausible-looking weights:

    * shapes or dtypes of ``loss_t1`` and ``loss_t2`` that differ raise (after
      export, the runtime rejects mismatched shapes: the two inputs are stacked,
      never broadcast);
    * a temperature that is not finite and > 0 raises ``ValueError`` in eager
      mode and TorchScript (one host read per call); an exported graph, and code
      under ``torch.compile``, return NaN weights for the affected rows instead;
    * a zero, NaN or infinite loss, i.e. a rate that is NaN or infinite, makes
      the whole row NaN.

    Example:
        >>> import torch
        >>> from dwa_export import DWAWeights
        >>> kernel = torch.jit.script(DWAWeights())
        >>> kernel(torch.tensor([0.75, 0.86]), torch.tensor([1.0, 1.0]), torch.tensor(2.0))
        tensor([0.9725, 1.0275])
    """

    def forward(self, loss_t1: Tensor, loss_t2: Tensor, temperature: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if not isinstance(temperature, Tensor):
                temperature = torch.as_tensor(temperature, dtype=loss_t1.dtype, device=loss_t1.device)
        _check_pair(loss_t1, loss_t2)
        out_dtype = loss_t1.dtype
        compute_dtype = torch.float32 if out_dtype == torch.float16 or out_dtype == torch.bfloat16 else out_dtype
        # DWA weights are constants to autograd; detaching also makes the
        # in-place steps below safe.
        loss_t1, loss_t2 = loss_t1.detach().to(compute_dtype), loss_t2.detach().to(compute_dtype)
        eager = torch.jit.is_scripting() or not torch.compiler.is_compiling()
        if eager:
            rates = loss_t1 / loss_t2  # _check_pair has rejected mismatched shapes
        else:
            # An exported graph cannot raise: stacking (not broadcasting) makes
            # every runtime reject mismatched shapes.
            pair = torch.stack((loss_t1, loss_t2))
            rates = pair[0] / pair[1]

        if eager:
            valid_temperature = (temperature > 0) & (temperature < math.inf)
            if not bool(valid_temperature.all()):
                _raise_invalid_temperature(temperature, valid_temperature)

        # Rows that must not get plausible weights become NaN, by arithmetic
        # rather than masks (which ONNX Runtime broadcasts slowly): x - x is 0
        # for finite x and NaN for NaN or +-inf. log(T) is finite only for
        # 0 < T < inf, and the smallest rate is -inf when a rate like -1 / 0
        # would otherwise silently get weight 0. NaN and +inf rates already
        # poison their row through the max.
        log_temperature = torch.log(temperature)
        smallest = rates.amin(-1, keepdim=True)
        poison = (log_temperature - log_temperature) + (smallest - smallest)

        # Subtracting the max first keeps exp() in (0, 1]; the shift is exact for
        # close rates, so tiny temperatures lose no more than the division does.
        # In place: ``rates`` is our own buffer, and large batches are bound by
        # memory traffic.
        exps = rates.sub_(rates.amax(-1, keepdim=True)).div_(temperature).exp_()
        weights = exps.div_(exps.mean(-1, keepdim=True) + poison)
        if weights.dtype != out_dtype:
            weights = weights.to(out_dtype)
        return weights
