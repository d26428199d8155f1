"""`--model` names of the neural families -> "module:Class" (imported lazily: torch only when used)."""

_PKG = "trainer.models.neural"

NEURAL_MODELS: dict[str, str] = {
    "ncf-gmf": f"{_PKG}.ncf:GMF",
    "ncf-mlp": f"{_PKG}.ncf:MLPRecommender",
    "neumf": f"{_PKG}.ncf:NeuMF",
    "wide-deep": f"{_PKG}.ctr:WideDeep",
    "deepfm": f"{_PKG}.ctr:DeepFM",
    "dcn": f"{_PKG}.ctr:DCN",
    "dcn-v2": f"{_PKG}.ctr:DCNv2",
    "youtube-dnn": f"{_PKG}.two_tower:YouTubeDNN",
    "dssm": f"{_PKG}.dssm:DSSM",
    "gru4rec": f"{_PKG}.sequential:GRU4Rec",
    "caser": f"{_PKG}.sequential:Caser",
}
