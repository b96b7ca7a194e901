"""The output layer + log-softmax of the no-grad (evaluation) path against a bare fp32 matrix
product of the same size: how close the fused blocked path gets to the matmul limit.

    python benchmarks/bench_output_layer.py 1     # threads
"""
import torch, time, sys
from latentlm.nn.decoders import LSTMDecoder
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
d=LSTMDecoder(10004,256,256,32).eval()
M=8800
flat=torch.randn(M,256); tgt=torch.randint(0,10000,(M,))
W=d.out.weight
with torch.no_grad():
  # pure matmul reference
  out=torch.empty(M,10004)
  torch.mm(flat,W.t(),out=out)
  ts=[]
  for _ in range(5):
      t=time.perf_counter(); torch.mm(flat,W.t(),out=out); ts.append(time.perf_counter()-t)
  ts.sort(); print("pure mm GFLOP/s %.0f"%(2*M*256*10004/ts[2]/1e9))
  for rows in (16,32,64,128,256,512):
    d.INFERENCE_BLOCK_ROWS={torch.float32: (rows, rows), torch.bfloat16: (rows, rows)}; d._logits_buffer=None
    for name,ctx in (("fp32",None),("bf16",torch.bfloat16)):
        def fn():
            if ctx is None: return d._inference_log_probs(flat,tgt)
            with torch.autocast("cpu",dtype=ctx): return d._inference_log_probs(flat,tgt)
        fn(); ts=[]
        for _ in range(5):
            t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
        ts.sort(); print(rows,name, "%.1f ms"%(ts[2]*1e3), "GFLOP/s %.0f"%(2*M*256*10004/ts[2]/1e9))
