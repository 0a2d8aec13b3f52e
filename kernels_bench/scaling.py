"""`python -m kernels_bench scaling`: communication bytes against compute per training step of distributed.train,
for a mesh of D data replicas x G latent shards, and where it stops scaling.

collective_bytes() counts the payload of every collective one step issues (checked against the calls of a real
gloo step in python_tests/distributed/test_distributed_train.py). Times use datasheet peaks, not measurements:
H100 SXM dense BF16 989 TFLOP/s, HBM3 3.35 TB/s, NVLink 4 450 GB/s per direction per
GPU, InfiniBand NDR 400 Gb/s = 50 GB/s per GPU (one NIC per GPU, as in a DGX H100). A ring all-reduce moves
2 (n - 1) / n times the payload through each rank's link; an all-gather (n - 1) / n of the gathered size.
Compute per step and rank: the dense encoder GEMM 2 * b * M * d * F_r FLOPs (every other FLOP of the step is
over the k * b kept codes, ~k / F_r of it) and Adam's 28 bytes per fp32 parameter (read param, grad, m, v; write
param, m, v), the two terms that grow with the dictionary.
"""

import argparse

PEAKS = dict(bf16_flops=989e12, hbm=3.35e12, nvlink=450e9, infiniband=50e9)
HIST = 2 * 65536 * 8  # the two int64 key histograms of batch_topk_sharded
TERMS = 3  # loss, reconstruction, aux (BatchTopK)


def collective_bytes(B, M, d, F, G, D, elt=4, dead=False, k_aux=None):
    """{(group, kind): payload bytes} of one distributed.train step (not a logging step), per rank, for a
    BatchTopK crosscoder with global batch B, dictionary F, G latent shards and D data replicas. elt: bytes of
    the compute dtype (the reconstruction's partial sums). dead: some latent is dead (the aux loss runs)."""
    b, F_r = B // D, -(-F // G)
    selection = 2 * D * G * 8 + HIST + D * G * b * 8 + 4  # sizes, histograms, tie counts, MIN threshold
    latent = selection + b * M * d * elt + 4 + 8  # + partial reconstructions, clip norm, dead count
    data = selection + 4 * TERMS + 4 * F_r  # + loss values, fired flags
    if D > 1:
        data += 4 * (2 * F_r * M * d + F_r + M * d)  # gradient sum of the shard and of b_dec (fp32)
    out = {("latent", "all_reduce"): latent, ("data", "all_reduce"): data}
    if dead:
        k_aux = k_aux or d // 2
        out[("latent", "all_reduce")] += G * 2 * b * 8 + b * M * d * 4  # tie counts, aux reconstruction
        out[("data", "all_reduce")] += M * d * 4 + 4  # batch mean and variance of the error
        out[("latent", "all_gather")] = G * b * k_aux * 4  # every rank's candidates
    return out


def step_times(B, M, d, F, G, D, link_latent, link_data, elt=2, dead=False):
    """(compute seconds, communication seconds) per step and rank at the peaks above."""
    b, F_r = B // D, -(-F // G)
    compute = 2 * b * M * d * F_r / PEAKS["bf16_flops"] + 28 * (2 * F_r * M * d) / PEAKS["hbm"]
    parts = collective_bytes(B, M, d, F, G, D, elt, dead)
    comm = 0.0
    for (group, kind), payload in parts.items():
        n, link = (G, link_latent) if group == "latent" else (D, link_data)
        if n > 1:
            comm += payload * (2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n) / link
    return compute, comm


def table(B=2048, M=2, d=2304, k=100):
    rows = []
    for F, label in ((73_728, "paper: F = 73,728"), (1 << 20, "F = 2^20")):
        for G, D, where in (
            (1, 8, "8 H100, 1 node"),
            (8, 1, "8 H100, 1 node"),
            (8, 2, "16 H100, 2 nodes"),
            (8, 8, "64 H100, 8 nodes"),
            (16, 1, "16 H100, 2 nodes"),
        ):
            latent_link = PEAKS["nvlink"] if G <= 8 else PEAKS["infiniband"]
            data_link = PEAKS["nvlink"] if G * D <= 8 else PEAKS["infiniband"]
            params = 2 * F * M * d * 4 * 4 / G  # fp32 params, grads, Adam m and v
            compute, comm = step_times(B * D, M, d, F, G, D, latent_link, data_link)
            payload = sum(collective_bytes(B * D, M, d, F, G, D, 2).values())
            rows.append(
                (
                    label,
                    where,
                    G,
                    D,
                    B * D,
                    params / 2**30,
                    payload / 2**20,
                    compute * 1e3,
                    comm * 1e3,
                    compute / (compute + comm),
                )
            )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-per-replica", type=int, default=2048)
    args = parser.parse_args(argv)
    print(
        "| dictionary | machines | G latent | D data | global batch | params+grads+Adam per GPU (GiB) | "
        "collective payload per rank (MiB) | compute (ms) | communication (ms) | compute share |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table(args.batch_per_replica):
        print(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.1f} | {r[6]:.1f} | {r[7]:.2f} | {r[8]:.2f} | "
            f"{r[9]:.0%} |"
        )


if __name__ == "__main__":
    main()
