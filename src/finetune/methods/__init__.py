"""Transfer methods the config instantiates, one small module each with its paper's formula (TLlib's layout,
`tllib/regularization/`). The regularisers toward the source (`regularizer` in conf/) are loss terms
(`finetune.models.losses.LossTerm`): `l2sp`, `bss`, `co_tuning`."""
