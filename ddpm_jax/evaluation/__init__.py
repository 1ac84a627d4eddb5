"""Sample-quality evaluation: FID / IS statistics and their feature networks.

`fid` holds the network-independent metrics (Frechet distance, Inception Score, streamed
statistics) and the `FeatureExtractor` interface; `inception` the FID Inception-v3
(TTUR / pytorch-fid weights); `classifier` a small CNN trained on the dataset itself, a
feature network for datasets without offline Inception weights (e.g. Fashion-MNIST);
`sample_quality` ties them to a config: feature network choice, cached reference
statistics of the training split, and `evaluate_samples` for --mode=eval.
"""
