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
    if loss_t1.size(-1) == 0:
        raise ValueError(
            "DWAWeights: the losses must have shape [..., K] with K >= 1 tasks, got shape {}".format(loss_t1.shape)
        )


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
    * K = 0 (an empty last dimension) raises ``ValueError``;
    * a temperature that is not finite and > 0 raises ``ValueError`` in eager
      mode (one host read per call); an exported graph, and code under
      ``torch.compile``, return NaN weights for the affected rows instead.

    Under TorchScript (``torch.jit.script``, a loaded ``.pt``) these
    ``ValueError`` s arrive as ``torch.jit.Error`` whose message ends in
    ``builtins.ValueError: DWAWeights: ...`` (LibTorch throws a C++ exception
    with the same message).

    Invalid numbers make rows NaN instead, in every runtime:

    * a row whose losses include a zero, a NaN or an infinity (in either input),
      or whose loss changed sign between the epochs (one negative, one
      positive), is all NaN: the same averages that ``DWAHistory.step()``
      rejects. Both losses negative is fine (a positive rate).

    Put differently, a row is valid iff every rate ``r_k = loss_t1[k] / loss_t2[k]``,
    computed in the compute dtype (float32 for float16/bfloat16 inputs), is finite
    and > 0. That also makes a row NaN when valid losses give a rate that is not
    representable: one that overflows (``|r| > 3.4e38`` in float32, ``1.8e308`` in
    float64) or underflows to zero (``|r| < 1.4e-45`` / ``4.9e-324``), i.e. a loss
    that grew by more than 38 (float64: 308) or fell by more than 45 (float64:
    324) orders of magnitude in one epoch. Subnormal rates are valid.

    Example:
        >>> import torch
        >>> from dwa_export import DWAWeights
        >>> kernel = torch.jit.script(DWAWeights())
        >>> kernel(torch.tensor([0.75, 0.86]), torch.tensor([1.0, 1.0]), torch.tensor(2.0))
        tensor([0.9725, 1.0275])
    """

    def forward(self, loss_t1: Tensor, loss_t2: Tensor, temperature: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # TorchScript skips this block: only under a bare guard
            given: object = temperature  # eager callers may pass a float
            if not isinstance(given, Tensor):
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
        # for finite x and NaN for NaN or +-inf, and log(x) is finite only for
        # 0 < x < inf. So ``guard - guard`` is 0 iff T and the row's smallest
        # rate are both finite and > 0, which is every rate in the row being
        # finite and > 0 except +inf, and a +inf (or NaN) rate already poisons
        # its row through the max below (inf - inf). A rate <= 0 or -inf is a
        # zero or infinite loss in either input, or a change of sign; NaN
        # propagates through amin. Summing the two logs (each in (-746, 710)
        # for a finite positive double) cannot overflow. In place on amin's
        # fresh [..., 1] output.
        guard = rates.amin(-1, keepdim=True).log_().add_(torch.log(temperature))
        poison = guard.sub_(guard)

        # Subtracting the max first keeps exp() in (0, 1]; the shift is exact for
        # close rates, so tiny temperatures lose no more than the division does.
        # In place: ``rates`` is our own buffer, and large batches are bound by
        # memory traffic.
        exps = rates.sub_(rates.amax(-1, keepdim=True)).div_(temperature).exp_()
        weights = exps.div_(exps.mean(-1, keepdim=True).add_(poison))
        if weights.dtype != out_dtype:
            weights = weights.to(out_dtype)
        return weights
