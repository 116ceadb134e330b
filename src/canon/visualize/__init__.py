"""What a trained network has learned, as Zeiler & Fergus (2013) and He et al. (2015) showed it:
first-layer filters, feature maps, deconvnet projections with max-pooling switches, their
evolution over training, invariance to transformations, occlusion maps, layer responses and
training curves (`canon visualize VERB`). Each writes PNGs and the numbers behind them."""
