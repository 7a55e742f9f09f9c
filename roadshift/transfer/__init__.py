"""Transfer learning from the source to the target domain.

- ``strategies``: which parameters train, at which learning rate and from which epoch,
  and how BatchNorm treats the target data (``plan_finetune``, ``reestimate_batchnorm``);
- ``domain``: penultimate-layer embeddings and the proxy A-distance between two domains
  (``embed``, ``proxy_a_distance``), logged by ``strategy: auto`` for information;
- ``selection``: the ``auto`` choice, by stratified k-fold cross-validation of the
  strategies on the target train split (``cross_validated_choice``);
- ``embeddings``: feature extraction on cached embeddings (``fit_head_on_embeddings``);
- ``self_training``: unlabelled target images: AdaBN (``adapt_batchnorm``) and
  FixMatch/AdaMatch-style pseudo-labelling (``self_train``).

Import from the submodules: this file stays empty so that using one part (say, the
plan) never pulls in the others' dependencies (scikit-learn, the training loop).
"""
