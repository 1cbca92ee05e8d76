"""The dot_generals of a jaxpr, for tests that count matrix multiplications (imported by
name: pytest puts tests/ on sys.path)."""

import jax.extend.core


def dot_generals(jaxpr, times: int = 1):
  """(equation, how many times it runs) for every dot_general of `jaxpr` and its
  sub-jaxprs, a scan body's once per iteration."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn, times
    length = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from dot_generals(sub, times * length)
