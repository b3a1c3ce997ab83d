"""The machines a plan is for: GPU types (memory, link speeds; peak TFLOP/s come from
``megalm.observe.flops.PEAK_TFLOPS``), what of a GPU's memory a layout may use, and a cluster of them.

Link speeds are per GPU and per direction, nominal datasheet figures: NVLink inside a node (or PCIe
where a GPU has no NVLink), the network card each GPU has to other nodes (400 Gb/s InfiniBand/RoCE
per GPU = 50 GB/s on H100/H200/B200 systems, 200 Gb/s on A100 and L40S ones). Collectives rarely
reach them (NCCL's all-reduce bus bandwidth is about 80% of NVLink's), so communication times
computed from them are lower bounds unless --intra-node-gbs/--inter-node-gbs say otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalm.observe.flops import peak_tflops


@dataclass(frozen=True)
class GPU:
    name: str  # what --gpu takes
    device_name: str  # as torch.cuda.get_device_name() says it: the key into flops.PEAK_TFLOPS
    memory_gb: float  # nominal capacity (the real one is slightly larger: "80 GB" parts hold 80 GiB)
    intra_node_gbs: float  # NVLink (or PCIe) bandwidth per GPU per direction, GB/s
    inter_node_gbs: float  # network bandwidth per GPU per direction, GB/s

    def peak_tflops(self, precision: str) -> float:
        peak = peak_tflops(self.device_name, precision)
        assert peak is not None, f"{self.device_name} is missing from megalm.observe.flops.PEAK_TFLOPS"
        return peak


GPUS = {gpu.name: gpu for gpu in (
    GPU("a100-40gb", "A100", 40, 300, 25),
    GPU("a100-80gb", "A100", 80, 300, 25),
    GPU("h100-sxm", "H100", 80, 450, 50),
    GPU("h100-pcie", "H100 PCIe", 80, 64, 50),  # PCIe 5.0 x16 between GPUs
    GPU("h200", "H200", 141, 450, 50),
    GPU("b200", "B200", 192, 900, 50),
    GPU("l40s", "L40S", 48, 32, 25),  # PCIe 4.0 x16, no NVLink
)}

# Per GPU and never in mem_peak_gb (torch.cuda.max_memory_allocated): the CUDA context and loaded
# kernels (~0.6 GB), NCCL's communicator buffers (~1 GB over the tp/dp/pp groups), cuBLAS workspaces.
CUDA_OVERHEAD_GB = 2.0
# The caching allocator cannot hand out every byte it reserved (fragmentation between block sizes):
# a layout fits when its allocated peak is at most this share of what the overhead leaves.
ALLOCATABLE_SHARE = 0.9


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    gpus: int
    gpus_per_node: int
    intra_node_gbs: float
    inter_node_gbs: float
    efficiency: float  # the share of the dense peak the matmuls reach

    @property
    def usable_gb(self) -> float:
        """What a layout's allocated peak may reach on one GPU."""
        return (self.gpu.memory_gb - CUDA_OVERHEAD_GB) * ALLOCATABLE_SHARE

    def link_gbs(self, span: int) -> float:
        """Bandwidth of a group of ``span`` consecutive ranks: NVLink inside a node, else the network."""
        return self.intra_node_gbs if span <= self.gpus_per_node else self.inter_node_gbs


def cluster(gpu: str, gpus: int, gpus_per_node: int = 8, intra_node_gbs: float = 0.0, inter_node_gbs: float = 0.0,
            efficiency: float = 0.5) -> Cluster:
    """A cluster of ``gpus`` GPUs of type ``gpu`` (a key of GPUS); link speeds 0 mean the GPU's defaults."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    if gpus < 1 or gpus_per_node < 1:
        raise ValueError(f"need at least one GPU and one per node, got {gpus} GPUs, {gpus_per_node} per node")
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise ValueError(f"{gpus} GPUs do not fill nodes of {gpus_per_node}")
    if not 0.0 < efficiency <= 1.0:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
    spec = GPUS[gpu]
    return Cluster(spec, gpus, min(gpus_per_node, gpus), intra_node_gbs or spec.intra_node_gbs,
                   inter_node_gbs or spec.inter_node_gbs, efficiency)
