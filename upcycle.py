"""
Sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055): start a DeepSeekMoE from a trained dense model,
its experts made of the dense MLP, so that the MoE computes exactly the dense model's function before training.
convert.py import --upcycle uses it; tests/test_convert.py checks the function is kept.

Every MLP that the MoE config makes an MoE layer (MTP modules' included) gets a freshly initialised router (the caller's) and a zero
routing bias, in one of two exact layouts:
  moe_inter_dim = inter_dim: every routed expert is a copy of the dense MLP, its down-projection divided by
      route_scale. The top-k sigmoid weights are renormalised to sum to 1, so whichever experts the router
      picks, route_scale * sum_k w_k MLP(x) = MLP(x). Shared experts copy the gate and up projections with a
      zero down-projection: they add nothing until trained. Training moves the experts apart (each sees other
      tokens), and then the router learns. The price: a token runs K full-width MLPs (K times the dense FFN
      compute) and a layer holds E copies.
  n_shared_experts * moe_inter_dim = inter_dim (fine-grained, DeepSeekMoE's shape): the shared experts are the
      dense MLP itself; routed expert e is the (e mod inter_dim/moe_inter_dim)-th slice of its hidden units with
      a zero down-projection, so the routed experts add nothing until trained. A token then runs the dense
      width plus K narrow experts. K narrow experts cannot sum to the dense MLP for every routing, so
      fine-grained experts cannot carry the dense function themselves; other widths are refused.
"""
import torch


def upcycle(sd, dense, cfg):
    """A dense model.py state dict (of ModelConfig dense) -> the tensors of the MoE config cfg, computing the
    same function. The routers' weights are left out: they keep the model's fresh initialisation. Raises
    ValueError for expert widths that cannot carry the dense function exactly."""
    I, m, E = dense.inter_dim, cfg.moe_inter_dim, cfg.n_routed_experts
    if m != I and (cfg.n_shared_experts * m != I or I % m):
        raise ValueError(f"upcycling is exact with moe_inter_dim = inter_dim ({I}, every expert a copy) or with "
                         f"n_shared_experts * moe_inter_dim = inter_dim (the shared experts are the dense MLP); "
                         f"got moe_inter_dim={m} with n_shared_experts={cfg.n_shared_experts}")
    out = dict(sd)
    blocks = {i: f"layers.{i}." for i in range(cfg.n_layer)}  # and the MTP modules' blocks, layers n_layer..
    blocks.update({cfg.n_layer + k: f"mtp.{k}.block." for k in range(cfg.mtp_depth)})
    for i in filter(cfg.is_moe, blocks):
        ffn = blocks[i] + "ffn."
        w1, w2, w3 = (out.pop(f"{ffn}{w}.weight") for w in ("w1", "w2", "w3"))
        units = [slice(e % (I // m) * m, (e % (I // m) + 1) * m) for e in range(E)]
        out[ffn + "experts.w1"] = torch.stack([w1[s] for s in units])
        out[ffn + "experts.w3"] = torch.stack([w3[s] for s in units])
        out[ffn + "experts.w2"] = torch.stack([w2[:, s] for s in units]) * (1 / cfg.route_scale if m == I else 0.0)
        out[ffn + "gate.bias"] = torch.zeros(E)
        if cfg.n_shared_experts:
            copies = cfg.n_shared_experts if m == I else 1
            out[ffn + "shared_experts.w1.weight"] = w1.repeat(copies, 1)
            out[ffn + "shared_experts.w3.weight"] = w3.repeat(copies, 1)
            out[ffn + "shared_experts.w2.weight"] = w2.repeat(1, copies) * (0.0 if m == I else 1.0)
    return out
