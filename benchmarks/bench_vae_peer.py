"""Sentence VAE: latentlm against the research code itself, jxhe/vae-lagging-encoder (He et al. 2019).

One process, one set of PTB batches, runs alternating rep by rep (the order rotates):

training (target tokens/s; tokens = words + </s>, B * (L - 1) per batch):
  peer          the repository's own VAE / LSTMEncoder / LSTMDecoder, its data reader and
                equal-length batches, its plain-VAE step (SGD lr 1.0, clip 5, dropout 0.5)
  ll_peer_fp32  latentlm's engine (``Trainer`` set-up, ``GradientLearner.step``) configured like
                the peer: sgd lr 1.0, clip 5, dropout 0.5, no word dropout, KL weight 1, same
                sizes, no output-layer bias (``model.decoder_options.output_bias: false``), initialized from the peer's initial weights; latentlm ``Batch``es of the
                very same sentences
  ll_peer_bf16  the same with ``train.precision: bf16-mixed``
  ll_def_fp32 / ll_def_bf16   latentlm's defaults (configs/ptb/vae.yaml: Adam, dropout 0.3, ...)

IS-500 evaluation (seconds per 100 sentences, first N PTB test sentences): the peer's
``text.calc_iwnll`` (one sentence at a time, 500 samples in chunks of 100) against
``latentlm.evaluation.importance_sampled_log_marginal`` on ``TextDataset.batch_indices`` batches, fp32
and bf16-mixed, all on the peer's trained weights (copied into latentlm's model).

Also in the same run: the machine's matmul limit (large fp32 / bf16 products, GFLOP/s), and how
close each path gets (model FLOPs per token / time).

    python benchmarks/bench_vae_peer.py --peer /tmp/vle --threads 1 2 --reps 3 --out runs/bench_vae_peer.json

The peer checkout is prepared by ``../shared/peers/setup_vae_peer.sh`` (it needs
``config/config_ptb.py``). Without ``--peer`` or with a missing checkout the script says so and
exits 0. Nothing of the peer is copied here: its modules are imported from the given path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informational only
        return platform.processor() or platform.machine()


def matmul_limit(reps: int = 10) -> dict:
    """GFLOP/s of a 2048^3 product and of the VAE's output-layer shape (4096 x 256 x 10k)."""
    import torch

    out = {}
    for name, (m, k, n) in {"square_2048": (2048, 2048, 2048), "out_layer_4096x256x10k": (4096, 256, 10000)}.items():
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            c = torch.empty(m, n, dtype=dtype)
            torch.mm(a, b, out=c)
            best = math.inf
            for _ in range(reps):
                t = time.perf_counter()
                torch.mm(a, b, out=c)
                best = min(best, time.perf_counter() - t)
            out[f"{name}_{str(dtype).split('.')[-1]}"] = 2 * m * k * n / best / 1e9
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", help="prepared checkout of jxhe/vae-lagging-encoder (setup_vae_peer.sh)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ptb"),
                    help="folder with ptb.{train,valid,test}.txt (default: ../shared/data/ptb beside the repository)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per rep and path")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--is-sents", type=int, default=50)
    ap.add_argument("--is-reps", type=int, default=None, help="IS reps (default: --reps)")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--valid-sents", type=int, default=500, help="validation sentences for the fp32/bf16 NLL check")
    ap.add_argument("--what", default="train,eval")
    ap.add_argument("--profile", default=None, help="write torch.profiler tables of one rep per path here")
    ap.add_argument("--seed", type=int, default=783435)
    ap.add_argument("--out", default=None)
    A = ap.parse_args()
    if not A.peer or not (Path(A.peer) / "config" / "config_ptb.py").is_file():
        print(f"bench_vae_peer: no prepared peer checkout at {A.peer!r} (run ../shared/peers/setup_vae_peer.sh "
              "GIT_DIR DEST, then pass --peer DEST); skipping.")
        return 0
    if not (Path(A.data) / "ptb.train.txt").is_file():
        print(f"bench_vae_peer: no PTB files in {A.data!r}; skipping.")
        return 0
    A.is_reps = A.is_reps or A.reps
    if A.is_sents < 10:  # the peer's calc_iwnll divides by round(batches / 10)
        print("bench_vae_peer: --is-sents below 10 is too few for the peer's calc_iwnll; using 10")
        A.is_sents = 10
    if A.samples < 100 or A.samples % 100:  # the peer samples in chunks of 100 (int(samples / 100) chunks)
        sys.exit("bench_vae_peer: --samples must be a multiple of 100 (the peer's calc_iwnll uses chunks of 100)")
    import numpy as np  # only now: without a peer the script skips before importing torch
    import torch
    out_path = Path(A.out).resolve() if A.out else None
    torch.manual_seed(A.seed)
    np.random.seed(A.seed)

    # ---------------------------------------------------------------- the peer (imported, not copied)
    peer_dir = str(Path(A.peer).resolve())
    sys.path.insert(0, peer_dir)
    cwd = os.getcwd()
    os.chdir(peer_dir)
    from data import MonoTextData  # noqa: E402  (the peer's modules)
    from modules import VAE, LSTMEncoder as PeerEncoder, LSTMDecoder as PeerDecoder  # noqa: E402
    import text as peer_text  # noqa: E402
    params = importlib.import_module("config.config_ptb").params
    os.chdir(cwd)
    params = dict(params, train_data=f"{A.data}/ptb.train.txt", val_data=f"{A.data}/ptb.valid.txt",
                  test_data=f"{A.data}/ptb.test.txt")
    dev = torch.device("cpu")
    pcfg = argparse.Namespace(momentum=0, nsamples=1, iw_nsamples=A.samples, kl_start=1.0, warm_up=10, aggressive=0,
                              cuda=False, device=dev, label=False, **params)
    train_data = MonoTextData(params["train_data"], label=False)
    pvocab = train_data.vocab
    PV = len(pvocab)

    def uniform(stdv):
        return lambda t: torch.nn.init.uniform_(t, -stdv, stdv)

    encoder = PeerEncoder(pcfg, PV, uniform(0.01), uniform(0.1))
    pcfg.enc_nh = pcfg.dec_nh
    decoder = PeerDecoder(pcfg, pvocab, uniform(0.01), uniform(0.1))
    vae = VAE(encoder, decoder, pcfg).to(dev)
    peer_init = {k: v.clone() for k, v in vae.state_dict().items()}
    enc_opt = torch.optim.SGD(vae.encoder.parameters(), lr=1.0, momentum=0)
    dec_opt = torch.optim.SGD(vae.decoder.parameters(), lr=1.0, momentum=0)

    def peer_train(batches):
        """text.py's plain-VAE step (aggressive=0, kl_weight 1): the calls it makes, in its order."""
        vae.train()
        tot = 0.0
        for x in batches:
            enc_opt.zero_grad()
            dec_opt.zero_grad()
            loss, loss_rc, loss_kl = vae.loss(x, 1.0, nsamples=1)
            loss = loss.mean(dim=-1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), peer_text.clip_grad)
            enc_opt.step()
            dec_opt.step()
            tot += loss_rc.sum().item() + loss_kl.sum().item()
        return tot

    # ---------------------------------------------------------------- latentlm
    from latentlm.config import load_config
    from latentlm.data.batching import Batch, TextDataset
    from latentlm.evaluation import importance_sampled_log_marginal
    from latentlm.precision import autocast
    from latentlm.training.trainer import Trainer, validate

    scratch = Path(tempfile.mkdtemp(prefix="bench_vae_peer_"))
    common = ["train.checkpoint_every=1000000", "train.eval_every=1000000", "train.log_every=1000000",
              "train.device=cpu", f"data.data_dir={A.data}", f"data.valid_limit={A.valid_sents}", "model.word_dropout=0"]
    peer_like = ["train.optimizer=sgd", "train.lr=1.0", "train.clip=5.0", "model.dropout=0.5",
                 "model.decoder_options.output_bias=false",
                 "objective.kl_schedule=1.0", "objective.free_bits=0"]
    configs = {"ll_peer_fp32": peer_like + ["train.precision=fp32"],
               "ll_peer_bf16": peer_like + ["train.precision=bf16-mixed"],
               "ll_def_fp32": ["train.precision=fp32"], "ll_def_bf16": ["train.precision=bf16-mixed"]}
    trainers = {}
    for name, over in configs.items():
        cfg = load_config(REPO / "configs" / "ptb" / "vae.yaml", common + over)
        tr = Trainer(cfg, scratch / name, progress=False)
        tr._setup()
        tr.system.train()
        trainers[name] = tr
    lvocab = trainers["ll_peer_fp32"].vocab
    # peer id -> latentlm id, by word
    lut = torch.tensor([lvocab.stoi.get(pvocab.id2word(i), lvocab.stoi["<unk>"]) for i in range(PV)])
    mapped = (lut != lvocab.stoi["<unk>"]) | (torch.arange(PV) == pvocab["<unk>"])
    assert int(mapped.sum()) == PV, "peer and latentlm vocabularies differ"

    def load_peer_weights(system, sd, missing_bias=0.0):
        """The peer's weights into latentlm's SentenceVAE + GaussianLSTMPosterior (same shapes; rows of
        the embeddings and the output layer permuted by word; latentlm's extra biases 0)."""
        m, q = system.model.decoder, system.posterior
        with torch.no_grad():
            for emb, key in ((q.encoder.embed, "encoder.embed.weight"), (m.embed, "decoder.embed.weight")):
                emb.weight.zero_()
                emb.weight[lut] = sd[key]
            for lstm, pre in ((q.encoder.lstm, "encoder.lstm."), (m.lstm, "decoder.lstm.")):
                for n, p in lstm.named_parameters():
                    p.copy_(sd[pre + n])
            q.to_params.weight.copy_(sd["encoder.linear.weight"]); q.to_params.bias.zero_()
            m.z_to_state.weight.copy_(sd["decoder.trans_linear.weight"]); m.z_to_state.bias.zero_()
            m.out.weight.zero_(); m.out.weight[lut] = sd["decoder.pred_linear.weight"]
            if m.out.bias is not None:  # (no output bias in the peer-like configuration, as in the peer)
                m.out.bias.fill_(missing_bias); m.out.bias[lut] = 0.0

    for name in ("ll_peer_fp32", "ll_peer_bf16"):
        load_peer_weights(trainers[name].system, peer_init)
        trainers[name].optimizer.state.clear()

    def to_batch(x):  # peer (B, L) equal-length tensor -> latentlm Batch of the same sentences
        B, L = x.shape
        return Batch(lut[x], torch.full((B,), L - 1, dtype=torch.long), torch.arange(B))

    all_batches = train_data.create_data_batch(batch_size=pcfg.batch_size, device=dev, batch_first=True)
    rng = np.random.RandomState(A.seed)
    perm = rng.permutation(len(all_batches))
    warm = [all_batches[i] for i in perm[: A.warmup]]
    timed = [all_batches[i] for i in perm[A.warmup : A.warmup + A.steps]]
    warm_l, timed_l = [to_batch(x) for x in warm], [to_batch(x) for x in timed]
    timed_tokens = sum(x.size(0) * (x.size(1) - 1) for x in timed)
    assert timed_tokens == sum(b.num_tokens for b in timed_l)
    steps_done = {name: 0 for name in trainers}

    def ll_train(name, batches):
        tr = trainers[name]
        tr.system.train()
        tot = 0.0
        for b in batches:
            out = tr.learner.step(b.to(tr.device), steps_done[name])
            steps_done[name] += 1
            tot += float(-out.bound.sum())
        return tot

    # FLOPs per target token of one training step (forward + backward = 3x forward), multiply-adds x 2
    E, H, Z = pcfg.ni, pcfg.dec_nh, pcfg.nz
    V = PV
    fwd_tok = 2 * (4 * H * (E + H) + 4 * H * (E + Z + H) + H * V)  # encoder LSTM + decoder LSTM + output layer
    train_flop_tok = 3 * fwd_tok
    is_flop_tok = A.samples * 2 * (4 * H * (E + Z + H) + H * V)  # per target token: decoder + output per sample
    # latentlm's IS does less arithmetic than the peer's: x's share of the LSTM input product once per
    # token, z's once per sample and sentence (LSTMDecoder.states_for_latents), not once per sample and token
    ll_is_flop_tok = A.samples * 2 * (4 * H * H + H * V) + 2 * 4 * H * E
    ll_is_flop_sent = A.samples * 2 * (4 * H * Z + Z * H)

    res = {"cpu": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
           "command": " ".join([Path(sys.executable).name] + sys.argv), "peer": peer_dir,
           "load_average_start": os.getloadavg(),
           "arch": dict(E=E, H=H, Z=Z, V_peer=PV, V_latentlm=len(lvocab), batch=pcfg.batch_size, dropout=0.5),
           "flop_per_token": {"train_step": train_flop_tok, "is_eval": is_flop_tok,
                              "is_eval_latentlm": ll_is_flop_tok, "is_eval_latentlm_per_sentence": ll_is_flop_sent},
           "train_steps_per_rep": len(timed), "train_tokens_per_rep": timed_tokens, "runs": {}}
    print(f"cpu {res['cpu']}; torch {torch.__version__}; V peer {PV} latentlm {len(lvocab)}; "
          f"{len(timed)} timed steps = {timed_tokens} target tokens per rep", flush=True)

    # the IS-500 test sentences
    test_lines = []
    with open(f"{A.data}/ptb.test.txt") as fh:
        for line in fh:
            if len(test_lines) >= A.is_sents:
                break
            test_lines.append(line.split())
    test_file = scratch / "test_head.txt"
    test_file.write_text("".join(" ".join(s) + "\n" for s in test_lines))
    peer_test = MonoTextData(str(test_file), label=False, vocab=pvocab)
    peer_test_batches = peer_test.create_data_batch(batch_size=1, device=dev, batch_first=True)
    l_test = TextDataset(test_lines, lvocab)
    is_tokens = l_test.num_tokens
    eval_system = trainers["ll_peer_fp32"].system

    def peer_is():
        vae.eval()
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            nll, _ = peer_text.calc_iwnll(vae, peer_test_batches, pcfg)
        return nll

    def ll_is(precision):
        eval_system.eval()
        tot = 0.0
        for idx in l_test.batch_indices(50):
            b = l_test.make_batch(idx)
            with autocast(precision, "cpu"):
                tot -= float(importance_sampled_log_marginal(eval_system.model, eval_system.posterior, b,
                                                             A.samples).sum())
        return tot / len(l_test)

    def med(xs):
        return statistics.median(xs)

    for threads in A.threads:
        torch.set_num_threads(threads)
        run = {"threads": threads, "matmul_gflops": matmul_limit()}
        print(f"\n== threads {threads}: matmul GFLOP/s " +
              ", ".join(f"{k} {v:.0f}" for k, v in run["matmul_gflops"].items()), flush=True)
        if "train" in A.what:
            paths = ["peer"] + list(trainers)
            for name in paths:  # warm-up (allocator, oneDNN kernels)
                peer_train(warm) if name == "peer" else ll_train(name, warm_l)
            tps = {n: [] for n in paths}
            for rep in range(A.reps):
                order = paths[rep % len(paths):] + paths[: rep % len(paths)]
                for name in order:
                    t = time.perf_counter()
                    peer_train(timed) if name == "peer" else ll_train(name, timed_l)
                    tps[name].append(timed_tokens / (time.perf_counter() - t))
                print(f"rep {rep}: " + "  ".join(f"{n} {tps[n][-1]:.0f}" for n in paths) + " tok/s", flush=True)
            peak32 = run["matmul_gflops"]["square_2048_float32"]
            peak16 = run["matmul_gflops"]["square_2048_bfloat16"]
            run["train"] = {n: {"tok_per_s_median": med(v), "runs": v, "ratio_to_peer": med(v) / med(tps["peer"]),
                                "gflops": med(v) * train_flop_tok / 1e9,
                                "fraction_of_matmul_limit": med(v) * train_flop_tok / 1e9 /
                                (peak16 if n.endswith("bf16") else peak32)} for n, v in tps.items()}
            for n in paths:
                r = run["train"][n]
                print(f"  {n:13s} {r['tok_per_s_median']:8.0f} tok/s  x{r['ratio_to_peer']:.2f} peer  "
                      f"{r['gflops']:.1f} GFLOP/s = {100 * r['fraction_of_matmul_limit']:.0f}% of matmul limit", flush=True)
            if A.profile:
                prof_dir = Path(A.profile)
                prof_dir.mkdir(parents=True, exist_ok=True)
                from torch.profiler import ProfilerActivity, profile
                for name in paths:
                    with profile(activities=[ProfilerActivity.CPU]) as p:
                        peer_train(timed[:10]) if name == "peer" else ll_train(name, timed_l[:10])
                    (prof_dir / f"train_{name}_t{threads}.txt").write_text(
                        p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        if "eval" in A.what:
            # validation NLL of the fp32 and bf16 engines after the same steps from the same start
            run["valid_after_equal_steps"] = {}
            for n, tr in trainers.items():
                pr = tr.config.train.precision
                run["valid_after_equal_steps"][n] = {"steps": steps_done[n],
                                                     "nll": validate(tr.system, tr.valid_set, 50, pr)["nll"]}
            print("valid NLL after equal steps: " + ", ".join(
                f"{n} {v['nll']:.2f} ({v['steps']} steps)" for n, v in run["valid_after_equal_steps"].items()),
                flush=True)
            # IS: all on the peer's current (trained) weights
            load_peer_weights(eval_system, {k: v.detach().clone() for k, v in vae.state_dict().items()},
                              missing_bias=-1e4)
            with torch.no_grad():  # warm-up
                peer_text.calc_iwnll  # noqa: B018
                with contextlib.redirect_stdout(io.StringIO()):
                    peer_text.calc_iwnll(vae, peer_test_batches[:10], pcfg)
                ll_is("fp32"), ll_is("bf16-mixed")
            names = ["peer", "ll_fp32", "ll_bf16"]
            sec, nll = {n: [] for n in names}, {n: [] for n in names}
            for rep in range(A.is_reps):
                for n in names[rep % 3:] + names[: rep % 3]:
                    t = time.perf_counter()
                    v = peer_is() if n == "peer" else ll_is("fp32" if n == "ll_fp32" else "bf16-mixed")
                    sec[n].append((time.perf_counter() - t) * 100 / len(l_test))
                    nll[n].append(v)
                print(f"IS rep {rep}: " + "  ".join(f"{n} {sec[n][-1]:.1f}s/100 nll {nll[n][-1]:.3f}" for n in names),
                      flush=True)
            if A.profile:
                from torch.profiler import ProfilerActivity, profile
                few = l_test.head(5)
                for n in names:
                    with profile(activities=[ProfilerActivity.CPU]) as p, torch.no_grad():
                        if n == "peer":
                            vae.eval()
                            for x in peer_test_batches[:5]:
                                vae.nll_iw(x, nsamples=A.samples, ns=100)
                        else:
                            b = few.make_batch(list(range(len(few))))
                            with autocast("fp32" if n == "ll_fp32" else "bf16-mixed", "cpu"):
                                importance_sampled_log_marginal(eval_system.model, eval_system.posterior, b, A.samples)
                    (Path(A.profile) / f"is_{n}_t{threads}.txt").write_text(
                        p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
            tok_per_100 = is_tokens * 100 / len(l_test)
            run["is_eval"] = {n: {"s_per_100_median": med(sec[n]), "runs": sec[n], "nll": nll[n],
                                  "nll_mean": statistics.mean(nll[n]),
                                  "speedup_vs_peer": med(sec["peer"]) / med(sec[n]),
                                  "gflops": tok_per_100 * is_flop_tok / med(sec[n]) / 1e9} for n in names}
            peak32 = run["matmul_gflops"]["square_2048_float32"]
            peak16 = run["matmul_gflops"]["square_2048_bfloat16"]
            for n in names:
                r = run["is_eval"][n]
                if n != "peer":  # "gflops": the peer's arithmetic per second; "own_gflops": the path's own
                    r["own_gflops"] = (tok_per_100 * ll_is_flop_tok + 100 * ll_is_flop_sent) / med(sec[n]) / 1e9
                r["fraction_of_matmul_limit"] = r.get("own_gflops", r["gflops"]) / (peak16 if n == "ll_bf16" else peak32)
                print(f"  {n:8s} {r['s_per_100_median']:7.1f} s/100 sents  x{r['speedup_vs_peer']:.2f}  "
                      f"NLL {r['nll_mean']:.3f}  {r.get('own_gflops', r['gflops']):.1f} GFLOP/s (own arithmetic) = "
                      f"{100 * r['fraction_of_matmul_limit']:.0f}% of limit", flush=True)
            run["is_eval"]["bf16_minus_fp32_nll"] = run["is_eval"]["ll_bf16"]["nll_mean"] - run["is_eval"]["ll_fp32"]["nll_mean"]
            run["is_eval"]["sentences"], run["is_eval"]["target_tokens"] = len(l_test), is_tokens
        again = matmul_limit()  # the limit again at the end: a busy machine is seen in both, keep the best
        run["matmul_gflops_end"] = again
        run["matmul_gflops"] = lim = {k: max(v, again[k]) for k, v in run["matmul_gflops"].items()}
        print(f"threads {threads}: matmul limit (best of start and end) fp32 {lim['square_2048_float32']:.0f}, "
              f"bf16 {lim['square_2048_bfloat16']:.0f} GFLOP/s", flush=True)
        for part in ("train", "is_eval"):
            for n, r in run.get(part, {}).items():
                if isinstance(r, dict) and "gflops" in r:
                    peak = lim["square_2048_bfloat16" if n.endswith("bf16") else "square_2048_float32"]
                    g = r.get("own_gflops", r["gflops"])
                    r["fraction_of_matmul_limit"] = g / peak
                    print(f"  {part} {n:13s} {g:6.1f} GFLOP/s = {100 * g / peak:3.0f}% of the "
                          f"{'bf16' if n.endswith('bf16') else 'fp32'} limit", flush=True)
        res["runs"][str(threads)] = run
        res["load_average_now"] = os.getloadavg()
        if out_path:  # after each thread count, so a slow later one does not lose the earlier
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(res, indent=1))
    res["load_average_end"] = os.getloadavg()
    shutil.rmtree(scratch, ignore_errors=True)
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=1))
        print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
