"""Metrics: routing statistics, layer analysis (ARank, cosine redundancy, selection, FLOPs) and the
`modadapt analyze` report."""
