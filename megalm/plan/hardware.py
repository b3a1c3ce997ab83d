"""The machines a plan is for: GPU types (memory, memory bandwidth, link speeds, the share of the peak
their matmuls reach; peak TFLOP/s come from ``megalm.observe.flops.PEAK_TFLOPS``), what of a GPU's
memory a layout may use, and a cluster of them.

Link speeds are per GPU and per direction, nominal datasheet figures: NVLink inside a node (or PCIe
where a GPU has no NVLink), the network card each GPU has to other nodes (400 Gb/s InfiniBand/RoCE
per GPU = 50 GB/s on H100/H200/B200 systems, 200 Gb/s on A100 and L40S ones). Collectives do not
reach them: a cluster's defaults are the nominal speeds times what NCCL achieves of them
(``NVLINK_SHARE``, ``NETWORK_SHARE``); --intra-node-gbs/--inter-node-gbs are taken as achieved speeds.
A collective whose group spans nodes has the network cards of its members in each node
(``Cluster.group_gbs``): rail-aligned rings cross each node boundary once per ring, one ring per card.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalm.observe.flops import peak_tflops

# The share of the dense bf16 peak the best-shaped matmul reaches: the "maximum achievable matmul FLOPS"
# (MAMF) of S. Bekman's ml-engineering book (compute/accelerator/README.md, measured with mamf-finder.py):
# A100 SXM 267.9 of 312 TFLOP/s (CUDA 12.1), H100 SXM 792.1 of 989 (CUDA 12.1; this workplace's H100 gave
# ~798 for an 8192^3 matmul, benchmarks/NOTES-kernels.md). No row there for H200, B200, L40S: they take
# the H100's share, an assumption the report names.
MAMF_A100 = 267.9 / 312
MAMF_H100 = 792.1 / 989


@dataclass(frozen=True)
class GPU:
    name: str  # what --gpu takes
    device_name: str  # as torch.cuda.get_device_name() says it: the key into flops.PEAK_TFLOPS
    memory_gb: float  # nominal capacity (the real one is slightly larger: "80 GB" parts hold 80 GiB)
    hbm_tbs: float  # memory bandwidth, TB/s (datasheet)
    intra_node_gbs: float  # NVLink (or PCIe) bandwidth per GPU per direction, GB/s
    inter_node_gbs: float  # network bandwidth per GPU per direction, GB/s
    mamf_share: float  # share of the dense peak the best-shaped bf16 matmul reaches (MAMF / peak)
    mamf_source: str  # where mamf_share comes from

    def peak_tflops(self, precision: str) -> float:
        peak = peak_tflops(self.device_name, precision)
        assert peak is not None, f"{self.device_name} is missing from megalm.observe.flops.PEAK_TFLOPS"
        return peak


_A100, _H100 = "MAMF of A100 SXM, 267.9 of 312 TFLOP/s", "MAMF of H100 SXM, 792.1 of 989 TFLOP/s"
_ASSUMED = "no published MAMF: the H100 SXM's 792.1/989, assumed"
GPUS = {gpu.name: gpu for gpu in (
    GPU("a100-40gb", "A100", 40, 1.555, 300, 25, MAMF_A100, _A100),
    GPU("a100-80gb", "A100", 80, 2.039, 300, 25, MAMF_A100, _A100),
    GPU("h100-sxm", "H100", 80, 3.35, 450, 50, MAMF_H100, _H100),
    GPU("h100-pcie", "H100 PCIe", 80, 2.0, 64, 50, MAMF_H100, _H100 + " (an SXM figure)"),  # PCIe 5.0 x16
    GPU("h200", "H200", 141, 4.8, 450, 50, MAMF_H100, _ASSUMED),
    GPU("b200", "B200", 192, 8.0, 900, 50, MAMF_H100, _ASSUMED),
    GPU("l40s", "L40S", 48, 0.864, 32, 25, MAMF_H100, _ASSUMED),  # PCIe 4.0 x16, no NVLink
)}

# What NCCL's collectives achieve of the nominal link speeds (bus bandwidth of nccl-tests):
# 8 x A100 80GB over NVLink, 200-208 GB/s of 300 (NVIDIA/nccl-tests issues #149, #178);
# 3 nodes of 8 x A100 with 4 HDR cards each, 85-96 GB/s of 100 (issue #119).
NVLINK_SHARE = 0.7
NETWORK_SHARE = 0.9
# What a memory-bound kernel achieves of the datasheet memory bandwidth: this workplace's H100 copies at
# ~3.0 of 3.35 TB/s (benchmarks/NOTES-kernels.md, the kernels benchmark's copy ceiling).
HBM_SHARE = 0.9

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
    intra_node_gbs: float  # achieved, per GPU per direction
    inter_node_gbs: float
    efficiency: float | None  # --efficiency: one share of the peak for every matmul; None: from their shapes

    @property
    def usable_gb(self) -> float:
        """What a layout's allocated peak may reach on one GPU."""
        return (self.gpu.memory_gb - CUDA_OVERHEAD_GB) * ALLOCATABLE_SHARE

    def group_gbs(self, stride: int, size: int, first: int = 0) -> float:
        """Bandwidth per GPU of a collective over ``size`` ranks ``stride`` apart from ``first`` (a multiple
        of ``stride``, which divides a node; nodes hold consecutive ranks): NVLink inside a node; across
        nodes, the network cards of the group's members in its least populated node, no more than NVLink
        (a ring passes all of the data through every node, one ring per card)."""
        node, end = self.gpus_per_node, first + stride * size
        if first // node == (end - 1) // node:
            return self.intra_node_gbs
        in_first = (node - first % node) // stride  # members in the first node, the last, and whole ones
        in_last = (end % node or node) // stride
        fewest = min(in_first, in_last, node // stride)
        return min(self.intra_node_gbs, fewest * self.inter_node_gbs)


def cluster(gpu: str, gpus: int, gpus_per_node: int = 8, intra_node_gbs: float = 0.0, inter_node_gbs: float = 0.0,
            efficiency: float | None = None) -> Cluster:
    """A cluster of ``gpus`` GPUs of type ``gpu`` (a key of GPUS); link speeds 0 mean the GPU's nominal ones
    at NCCL's achieved shares."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    if gpus < 1 or gpus_per_node < 1:
        raise ValueError(f"need at least one GPU and one per node, got {gpus} GPUs, {gpus_per_node} per node")
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise ValueError(f"{gpus} GPUs do not fill nodes of {gpus_per_node}")
    if efficiency is not None and not 0.0 < efficiency <= 1.0:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
    spec = GPUS[gpu]
    return Cluster(spec, gpus, min(gpus_per_node, gpus), intra_node_gbs or spec.intra_node_gbs * NVLINK_SHARE,
                   inter_node_gbs or spec.inter_node_gbs * NETWORK_SHARE, efficiency)
