"""Gradient checking for anyone's layer, and ``tinyvit gradcheck`` for tinyvit's own.

```python
from tinyvit.gradcheck import check_backward, assert_backward
report = check_backward(forward, backward, args, torch_forward=None, mode="full")
assert report.ok, report          # or: assert_backward(forward, backward, args)
```

- :mod:`.check`: :func:`check_backward`, :func:`assert_backward`, the :class:`Report` and the tolerances;
- :mod:`.cases`: the registry, one :class:`Case` per layer of ``tinyvit/layers/`` (add yours there);
- :mod:`.command`: ``tinyvit gradcheck``.
"""
from .check import MODES, TOLERANCES, GradcheckWarning, Report, Row, assert_backward, check_backward

__all__ = ["MODES", "TOLERANCES", "GradcheckWarning", "Report", "Row", "assert_backward", "check_backward"]


def register(subparsers) -> None:
    from .command import register as _register
    _register(subparsers)
