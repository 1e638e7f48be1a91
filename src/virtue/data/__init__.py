"""The data layer that training, evaluation and `virtue data` share: the published datasets' layouts
(`data.layouts`), one reader of parquet and `datasets` files (`data.parquet`), and the row checks (`data.rows`).

Sits below `train` and `eval` and imports none of them. Nothing is imported here, so that `virtue data --help`
loads `data.layouts` alone.
"""
