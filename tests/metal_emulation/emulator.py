"""Run `mx.fast.metal_kernel` sources on the CPU: a drop-in `metal_kernel` for machines without Metal.

`metal_kernel(**spec)` takes the arguments of `mx.fast.metal_kernel` and returns a callable
with the same call signature. A call writes the source MLX generates for that launch
(`kernel_source`, a port of mlx/backend/common/metal_kernel.cpp: template line, the signature
with `const device T*` / `const constant T*` (fewer than 8 elements) / `const constant T&`
(0-d) inputs, `<name>_shape/_strides/_ndim` where the body names them, outputs, then the
thread attributes the body names), compiles it with clang++ against metal_shim.h, and runs
the launch over CPU copies of the inputs. Builds are cached by source in a temp folder.

The launch is checked the way a GPU would not: outputs start as NaN (unless `init_value`),
every buffer sits between NaN guard zones, and a write into a guard zone, a crash or a
deadlock at a barrier raises `KernelError`. See README.md for what is not modelled.
"""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import mlx.core as mx

SHIM = Path(__file__).with_name("metal_shim.h")
CACHE = Path(tempfile.gettempdir()) / "mlx-linear-metal-emulation"
CXXFLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-strict-aliasing",
            "-Wno-unknown-attributes"]
GUARD_BYTES = 1 << 12
SCHEDULES = (0, 1)  # simdgroups first to last, then last to first: results must be equal
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes smaller inputs in the constant address space

# (attribute, type) in the order MLX appends them to the signature.
ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

TYPE_NAMES = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}


# Per input, where the body names `<name>_shape`, `_strides` or `_ndim`: its declaration, the
# driver's cast of its buffer, and its value (row-contiguous strides, as ensure_row_contiguous).
SHAPE_PARTS = [
    ("shape", "const constant int* {}_shape", "(const int*)", lambda x: np.array(x.shape, np.int32)),
    ("strides", "const constant int64_t* {}_strides", "(const int64_t*)",
     lambda x: np.cumprod((x.shape[1:] + (1,))[::-1])[::-1].astype(np.int64)),
    ("ndim", "const constant int& {}_ndim", "*(const int*)", lambda x: np.array(x.ndim, np.int32)),
]


class KernelError(RuntimeError):
    pass


def compiler():
    """clang++, on Linux (the lanes switch stacks with ELF assembly or ucontext); else None."""
    if not sys.platform.startswith("linux"):
        return None
    return os.environ.get("CXX_METAL_EMULATION") or shutil.which("clang++")


def _template_def(template):
    values = []
    for _, value in template:
        if isinstance(value, bool):
            values.append(str(int(value)))  # C++ streams print bools as 1/0
        elif isinstance(value, int):
            values.append(str(value))
        else:
            values.append(TYPE_NAMES[value])
    return "<" + ", ".join(values) + ">"


def _template_kind(value):
    return "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "typename"


def _passing(x):
    """How MLX passes an input: by reference when 0-d, in constant memory when small."""
    if x.ndim == 0:
        return "constant", "&", "s"
    if x.size < MAX_CONSTANT_ARRAY_SIZE:
        return "constant", "*", "c"
    return "device", "*", ""


def kernel_name(name, inputs, output_dtypes, template):
    """Name MLX gives the launch: template hash, then input and output types."""
    result = "custom_kernel_" + name
    if template:
        result += "_" + _template_def(template).replace(", ", "_").replace("<", "_").replace(">", "_")[:-1]
    for x in inputs:
        result += "_" + TYPE_NAMES[x.dtype] + _passing(x)[2]
    for dtype in output_dtypes:
        result += "_" + TYPE_NAMES[dtype]
    return result


class EmulatedKernel:
    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, schedules=SCHEDULES):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if atomic_outputs:
            raise NotImplementedError("atomic outputs are not emulated")
        self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)
        self.source, self.header, self.schedules = source, header, schedules
        # What MLX looks for in the body, by plain substring search.
        self.shape_infos = [[f"{n}_{part}" in source for part, *_ in SHAPE_PARTS] for n in input_names]
        self.attributes = [(a, t) for a, t in ATTRIBUTES if a in source]

    def _shape_parts(self, index, x):
        """The SHAPE_PARTS entries of input `index`, in buffer order."""
        present = self.shape_infos[index] if x.ndim > 0 else [False] * len(SHAPE_PARTS)
        return [part for part, used in zip(SHAPE_PARTS, present) if used]

    def kernel_source(self, inputs, output_dtypes, template):
        """The Metal source MLX compiles for this launch (without its prepended utils header)."""
        fname = kernel_name(self.name, inputs, output_dtypes, template)
        text = self.header
        if template:
            kinds = [_template_kind(v) for _, v in template]
            text += "template <" + ", ".join(f"{kind} {n}" for kind, (n, _) in zip(kinds, template)) + ">\n"
        text += f"[[kernel]] void {fname}(\n"
        index = 0
        for k, (name, x) in enumerate(zip(self.input_names, inputs)):
            location, ref, _ = _passing(x)
            text += f"  const {location} {TYPE_NAMES[x.dtype]}{ref} {name} [[buffer({index})]],\n"
            index += 1
            for _, declaration, _, _ in self._shape_parts(k, x):
                text += f"  {declaration.format(name)} [[buffer({index})]],\n"
                index += 1
        for name, dtype in zip(self.output_names, output_dtypes):
            text += f"  device {TYPE_NAMES[dtype]}* {name} [[buffer({index})]]"
            # MLX's own test (index counts the shape buffers too): kept as is.
            last = not (index < len(inputs) + len(self.output_names) - 1 or self.attributes)
            text += ") {\n" if last else ",\n"
            index += 1
        for k, (attribute, type_name) in enumerate(self.attributes):
            text += f"  {type_name} {attribute} [[{attribute}]]"
            text += ",\n" if k < len(self.attributes) - 1 else ") {\n"
        text += self.source + "\n}\n"
        if template:
            instance = fname + _template_def(template)
            text += f'\ntemplate [[host_name("{fname}")]] [[kernel]] decltype({instance}) {instance};\n'
        return text

    def _driver(self, inputs, output_dtypes, template):
        """C++ that calls the kernel once per lane with its buffers and thread attributes."""
        args = []
        for k, x in enumerate(inputs):
            args.append(("*" if x.ndim == 0 else "") + f"(const {TYPE_NAMES[x.dtype]}*)")
            args += [cast for _, _, cast, _ in self._shape_parts(k, x)]
        args += [f"({TYPE_NAMES[dtype]}*)" for dtype in output_dtypes]
        args = [f"{cast}b[{slot}]" for slot, cast in enumerate(args)]
        args += [f"metal_emu::lane().{attribute}" for attribute, _ in self.attributes]
        call = kernel_name(self.name, inputs, output_dtypes, template) + (_template_def(template) if template else "")
        return (
            f"\nstatic void metal_emu_body(void** b) {{\n  {call}(\n    " + ",\n    ".join(args) + ");\n}\n"
            'extern "C" __attribute__((visibility("default")))\n'
            "int metal_emu_launch(void** buffers, const uint* grid, const uint* group, int order, char* error,\n"
            "                     int size) {\n"
            "  return metal_emu::launch(grid, group, order, metal_emu_body, buffers, error, size);\n}\n"
        )

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        names = len(self.output_names)
        if len(inputs) != len(self.input_names) or not len(output_shapes) == len(output_dtypes) == names:
            raise ValueError("[metal_kernel] inputs, output_shapes and output_dtypes must match the names")
        template = list(template or [])
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        source = self.kernel_source(inputs, output_dtypes, template)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{source}\n```")
        library = _build(_host_source(source) + self._driver(inputs, output_dtypes, template))
        launch = (inputs, output_shapes, output_dtypes, grid, threadgroup, init_value)
        runs = [self._run(library, *launch, order) for order in self.schedules]
        for other in runs[1:]:
            for name, a, b in zip(self.output_names, runs[0], other):
                if a.tobytes() != b.tobytes():
                    raise KernelError(
                        f"{self.name}: `{name}` depends on the order simdgroups run in (a race: a missing barrier?)")
        return [mx.array(out).view(dtype) if dtype == mx.bfloat16 else mx.array(out)
                for out, dtype in zip(runs[0], output_dtypes)]

    def _run(self, library, inputs, output_shapes, output_dtypes, grid, threadgroup, init_value, order):
        buffers = []
        for k, x in enumerate(inputs):
            buffers.append(_Buffer(_to_numpy(x)))
            buffers += [_Buffer(value(x)) for _, _, _, value in self._shape_parts(k, x)]
        outputs = [_Buffer(_empty(shape, dtype, init_value)) for shape, dtype in zip(output_shapes, output_dtypes)]
        pointers = (ctypes.c_void_p * (len(buffers) + len(outputs)))(*[b.pointer for b in buffers + outputs])
        # dispatchThreads: threadgroups are clipped to the grid (custom_kernel.cpp).
        group = [min(t, g) for t, g in zip(threadgroup, grid)]
        error = ctypes.create_string_buffer(512)
        sizes = [(ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*group)]
        status = library.metal_emu_launch(pointers, *sizes, order, error, len(error))
        if status != 0:
            raise KernelError(f"{self.name}: {error.value.decode()}")
        for name, buffer in zip(self.output_names, outputs):
            if not buffer.guards_intact():
                raise KernelError(f"{self.name}: a thread wrote outside `{name}`")
        if not all(buffer.guards_intact() for buffer in buffers):
            raise KernelError(f"{self.name}: a thread wrote outside an input")
        return [out.data.copy() for out in outputs]


def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True, atomic_outputs=False,
                 **options):
    """Drop-in for mx.fast.metal_kernel that runs on the CPU (options: `schedules`)."""
    return EmulatedKernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs,
                          **options)


def _host_source(source):
    # C++ takes no attributes on an explicit instantiation: drop MLX's host_name there.
    source = re.sub(r"^template \[\[host_name\(\"\w+\"\)\]\] \[\[kernel\]\] ", "template ", source, flags=re.M)
    return f'#include "{SHIM}"\n' + source


def _to_numpy(x):
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.array(x))  # ensure_row_contiguous: row-major copies


def _empty(shape, dtype, init_value):
    if init_value is not None:
        return _to_numpy(mx.full(shape, init_value, dtype=dtype))
    out = np.empty(shape, np.uint16 if dtype == mx.bfloat16 else np.dtype(str(dtype).split(".")[-1]))
    out.view(np.uint8)[...] = 0xFF  # NaN in every float type: unwritten outputs show
    return out


class _Buffer:
    """An array between two NaN guard zones."""

    def __init__(self, array):
        self.raw = np.full(array.nbytes + 2 * GUARD_BYTES, 0xFF, np.uint8)
        self.data = self.raw[GUARD_BYTES : GUARD_BYTES + array.nbytes].view(array.dtype).reshape(array.shape)
        self.data[...] = array
        self.pointer = self.raw.ctypes.data + GUARD_BYTES

    def guards_intact(self):
        guards = np.concatenate([self.raw[:GUARD_BYTES], self.raw[GUARD_BYTES + self.data.nbytes :]])
        return bool((guards == 0xFF).all())


_libraries = {}


def _build(code):
    """Compile once per source (cached across sessions in a temp folder); load the library."""
    key = hashlib.sha256((code + SHIM.read_text() + " ".join(CXXFLAGS)).encode()).hexdigest()[:24]
    if key in _libraries:
        return _libraries[key]
    CACHE.mkdir(parents=True, exist_ok=True)
    library = CACHE / f"{key}.so"
    if not library.exists():
        source = CACHE / f"{key}.{os.getpid()}.cpp"
        source.write_text(code)
        partial = source.with_suffix(".so")
        command = [compiler(), *CXXFLAGS, "-o", str(partial), str(source)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelError(f"clang++ could not compile {source}:\n{result.stderr[-4000:]}")
        partial.replace(library)
    lib = ctypes.CDLL(str(library))
    lib.metal_emu_launch.restype = ctypes.c_int
    _libraries[key] = lib
    return lib
