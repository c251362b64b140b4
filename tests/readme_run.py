"""A small synthetic multi-task training whose DWA log makes README's picture.

    python tests/readme_run.py tests/data/readme_run.pt
    dwa-export plot tests/data/readme_run.pt -o tests/data/dwa_weights.png

Three regression heads on a shared trunk; the targets' scales make one task easy
(its loss falls fast), one slow and one noisy, so DWA moves the weights.
"""

from __future__ import annotations

import sys

import torch

from dwa_export import DWA


def main(path: str, epochs: int = 30) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    dwa = DWA(temperature=2.0, tasks=("easy", "slow", "noisy"))
    x = torch.randn(512, 8)
    truth = torch.stack([x[:, 0], torch.sin(3 * x[:, 1]) * x[:, 2], x[:, 3] * x[:, 4]], dim=1)
    for _ in range(epochs):
        for batch in torch.randperm(512).split(32):
            noise = torch.randn(len(batch), 3) * torch.tensor([0.0, 0.0, 0.5])
            losses = (model(x[batch]) - truth[batch] - noise).pow(2).mean(0)
            optimizer.zero_grad()
            dwa(losses).backward()
            optimizer.step()
        dwa.step()
    torch.save({"model": model.state_dict(), "dwa": dwa.state_dict()}, path)


if __name__ == "__main__":
    main(sys.argv[1])
