"""A stand-in for the CUDA driver, so that Triton's GPU-only machinery runs on a machine
without a GPU: the JIT compiles for a real architecture with the bundled ptxas, the
autotuner prunes and picks through its own `Autotuner.run`, and only the device parts are
replaced (device and stream queries, the device's limits, loading a binary, launching it
and timing it). Launches are recorded, not run: outputs stay unwritten.

Use it in a process where TRITON_INTERPRET is not set (the kernels must be JITFunctions),
before the package's kernels first launch:

    from fake_gpu import FakeDriver
    fake = FakeDriver.install(arch=90)
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Opt-in shared memory per block, multiprocessors (as CUDA reports them).
DEVICES = {90: {"max_shared_mem": 232448, "multiprocessor_count": 132},
           80: {"max_shared_mem": 166912, "multiprocessor_count": 108}}


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    shared: int
    constants: dict


@dataclass
class FakeDriver:
    arch: int = 90
    shared_limit: int | None = None
    multiprocessors: int | None = None
    launches: list[Launch] = field(default_factory=list)
    benchmarked: list[dict] = field(default_factory=list)
    # (kernel, bytes asked, bytes given) of each global scratch allocation at a launch.
    scratch: list[tuple[str, int, int]] = field(default_factory=list)
    # Called by the fake benchmarker with each candidate's launch; returns its "time" in ms.
    timing: object = None

    @classmethod
    def install(cls, **kwargs) -> FakeDriver:
        from triton.runtime.driver import driver

        fake = cls(**kwargs)
        driver.set_active(fake)
        return fake

    # -- what triton.runtime.jit and triton.compiler ask of the active driver
    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    @property
    def utils(self) -> FakeDriver:
        return self

    def get_device_properties(self, device: int) -> dict:
        props = dict(DEVICES[self.arch])
        if self.shared_limit is not None:
            props["max_shared_mem"] = self.shared_limit
        if self.multiprocessors is not None:
            props["multiprocessor_count"] = self.multiprocessors
        return props

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads per block)
        return object(), object(), 0, 0, 1024

    def launcher_cls(self, src, metadata):
        def launch(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args):
            if metadata.global_scratch_size > 0:
                # As Triton's CUDA launcher does: a kernel that makes tensor descriptors gets
                # their global scratch from the allocator set by triton.set_allocator.
                from triton.runtime import _allocation

                size = gx * gy * gz * metadata.global_scratch_size
                buffer = _allocation._allocator.get()(size, metadata.global_scratch_align, stream)
                self.scratch.append((metadata.name, size, buffer.numel()))
            names = src.fn.arg_names
            constants = {names[path[0]]: value for path, value in src.constants.items() if len(path) == 1}
            self.launches.append(Launch(metadata.name, (gx, gy, gz), metadata.num_warps, metadata.num_stages,
                                        metadata.shared, constants))

        return launch

    def get_benchmarker(self):
        def do_bench(kernel_call, quantiles=None, **_):
            before = len(self.launches)
            kernel_call()
            launched = self.launches[before:]
            self.benchmarked.extend(vars(x) for x in launched)
            ms = self.timing(launched[-1]) if self.timing is not None and launched else 1.0
            return [ms, ms, ms]

        return do_bench
