"""hvcodistill.startup: torch._dynamo stays unimported through what a rank does with an optimizer,
and is the real module, compiling as ever, the moment something needs it. Each case runs in a
fresh interpreter: which modules are loaded is the subject."""

import os
import subprocess
import sys
import textwrap

from tests.helpers import ROOT

OPTIMIZE = """
    import sys
    import torch
    import hvcodistill.optim  # defers torch._dynamo on import
    from hvcodistill.startup import DeferredDynamo

    def deferred():
        return isinstance(sys.modules["torch._dynamo"], DeferredDynamo)

    layers = torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
    model = torch.nn.Sequential(*layers)
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                torch.optim.AdamW(model.parameters(), lr=0.1)):
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(5, 4)).sum().backward()
            opt.step()
        opt.load_state_dict(opt.state_dict())
"""


def run(code: str, **env) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_optimizers_and_a_process_group_leave_dynamo_unimported():
    """Build, step, zero, save and load SGD and AdamW; start a gloo process group (whose
    init_process_group clears dynamo's caches): the stand-in is still in place, and none of
    dynamo's submodules was imported."""
    out = run(
        OPTIMIZE
        + """
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    dist.destroy_process_group()
    print(deferred(), sorted(m for m in sys.modules if m.startswith("torch._dynamo.")))
    """
    )
    assert out == "True []"


def test_compile_loads_the_real_dynamo_and_compiles_as_ever():
    """After the optimizers have run under the stand-in, torch.compile imports the real module,
    which takes the stand-in's place for good; the compiled function equals the eager one, and the
    optimizers go on working."""
    out = run(
        OPTIMIZE
        + """
    f = lambda x: torch.sin(x) * 2 + 1
    x = torch.randn(16)
    compiled = torch.compile(f, backend="eager")
    assert torch.equal(compiled(x), f(x))
    import torch._dynamo
    real = sys.modules["torch._dynamo"]
    assert torch._dynamo is real and hasattr(real, "optimize")
    opt.zero_grad(); model(torch.randn(5, 4)).sum().backward(); opt.step()
    print(deferred())
    """
    )
    assert out == "False"


def test_turned_off_by_the_environment():
    out = run(OPTIMIZE + "\n    print(deferred())", HVCODISTILL_DEFER_DYNAMO="0")
    assert out == "False"
