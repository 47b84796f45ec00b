"""Runtime settings of kfjax's compiled programs: XLA:CPU compiler options and JAX's
persistent compilation cache.

:func:`jit` is ``jax.jit`` with kfjax's XLA:CPU compiler options (:data:`CPU_COMPILER_OPTIONS`);
every compiled training and sampling program in kfjax goes through it.
:func:`use_compile_cache` keeps those programs in JAX's persistent compilation cache.
"""

import functools
import os

import jax

# XLA:CPU hands convolutions to YNNPACK by default, which runs them slower than XLA's own
# (Eigen) convolutions, and far slower without padding; keeping YNNPACK for matrix
# products and reductions only speeds up both phases (BENCHMARKS.md, "Throughput").
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options():
  """The compiler options :func:`jit` passes: :data:`CPU_COMPILER_OPTIONS` on the CPU
  backend, ``None`` elsewhere, when ``XLA_FLAGS`` already chooses the YNNPACK fusions
  (the user's choice wins), or when this jaxlib does not know the option."""
  if jax.default_backend() != "cpu" or "ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
  except Exception:  # noqa: BLE001 - an unknown option is an XLA runtime error
    return None
  return dict(CPU_COMPILER_OPTIONS)


def jit(fun=None, **kwargs):
  """``jax.jit`` with :func:`compiler_options`; usable as ``@jit`` or ``jit(f, ...)``."""
  if fun is None:
    return functools.partial(jit, **kwargs)
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)


# JAX's persistent compilation cache, which ``kfjax.main`` turns on (``--compile_cache``).
CACHE_MAX_BYTES = 2 * 2 ** 30  # least recently used programs go first


def compile_cache_dir(flag_value):
  """The cache folder for the command line's ``--compile_cache`` value (None: off): the
  value itself, else ``$JAX_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/kfjax/jax``
  (``~/.cache/kfjax/jax``); ``""`` turns the cache off."""
  if flag_value is not None:
    return os.path.expanduser(flag_value) or None
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "kfjax", "jax")


def cache_max_bytes(environ=os.environ):
  """The cache's size cap: ``$JAX_COMPILATION_CACHE_MAX_SIZE`` (JAX's own variable, bytes;
  -1: no cap) if set, else :data:`CACHE_MAX_BYTES`. A capped cache lists and stats every
  entry on each write to find what to evict, which grows slow with many small entries."""
  raw = environ.get("JAX_COMPILATION_CACHE_MAX_SIZE", "").strip()
  try:
    return int(raw) if raw else CACHE_MAX_BYTES
  except ValueError:
    return CACHE_MAX_BYTES


def use_compile_cache(path):
  """Point JAX's persistent compilation cache at ``path`` (size-capped by
  :func:`cache_max_bytes`); a folder that cannot be made or written only costs the compile
  time, so it never stops a run. Call it before the process compiles anything: JAX decides
  once, at the first compile, whether the cache is on."""
  if not path:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  if not os.access(path, os.W_OK):
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_compilation_cache_max_size", cache_max_bytes())
  return path


# Several images at once over a host's devices: the ``images`` axis of a mesh of local
# devices. Each device runs its own images' steps, so nothing crosses devices inside a
# step (no collectives): the mesh only places the work.
IMAGES = jax.sharding.PartitionSpec("images")
SHARED = jax.sharding.PartitionSpec()


def image_mesh(num_devices):
  """A 1-D mesh named ``images`` over the first ``num_devices`` local devices (local:
  in a multi-process run each process keeps to its own devices). Its axis is ``Auto``
  (``jax.make_mesh`` would make it ``Explicit``, whose sharding-in-types rules the
  ``shard_map`` programs here do not need)."""
  import numpy as np  # noqa: PLC0415
  devices = jax.local_devices()[:num_devices]
  return jax.sharding.Mesh(np.array(devices), ("images",),
                           axis_types=(jax.sharding.AxisType.Auto,))


def over_images(fun, mesh, in_specs, out_specs):
  """``fun`` (which handles a block of images, e.g. vmapped) run on each device of
  ``mesh`` with its share of the images (leaves with spec :data:`IMAGES`) and every
  :data:`SHARED` leaf whole. Values that ``fun`` returns as :data:`SHARED` must be the
  same on every device (e.g. step counters), so they are not checked (``check_vma``)."""
  return jax.shard_map(fun, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)
