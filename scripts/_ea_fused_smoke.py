import sys, time, torch, triton
from tokenprune.kernels import triton_impl as T, reference as R
print("triton", triton.__version__, "torch", torch.__version__, flush=True)
for d, h in ((64, 12), (128, 16)):
    for n in (1000, 8192):
        q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
        ref = R.efficient_attention(q.float(), k.float(), v.float(), None)
        for fz in (None, 64):
            T.EA_CONFIG["fused"] = {64: fz, 128: fz}
            t0 = time.time()
            out = T.efficient_attention(q, k, v, None); torch.cuda.synchronize()
            print(d, n, fz, "err", float((out.float() - ref).norm() / ref.norm()), "s", round(time.time() - t0, 2), flush=True)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = T.efficient_attention(q, k, v, None)
        g.replay(); torch.cuda.synchronize()
        print("graph err", float((out.float() - ref).norm() / ref.norm()), flush=True)
