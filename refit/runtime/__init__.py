"""What every run stands on, whatever it trains: the training loop (:mod:`.loop`), run folders,
checkpoints and resume (:mod:`.runs`), progress, signals and time budgets (:mod:`.control`), several
processes under torchrun (:mod:`.distributed`), and CUDA-graph sampling (:mod:`.cudagraph`)."""
