"""Sample-quality evaluation: FID / IS statistics and their feature networks.

`metrics` holds the network-independent metrics (Frechet distance, Inception Score,
statistics that merge across batches and processes); `features` the `FeatureExtractor`
interface and the streaming of images into those statistics; `inception` the FID
Inception-v3 (TTUR / pytorch-fid weights); `classifier` a small CNN trained on the dataset
itself, a feature network for datasets without offline Inception weights (e.g.
Fashion-MNIST); `sample_quality` ties them to a config: feature network choice, cached
reference statistics of the training split, `score_samples` (each process its share) for
--mode=eval and `evaluate_samples` for samples held in memory.
"""
