"""A grid's plots, for `gridfleet plots`, the end of `gridfleet run` and the dashboard.

`data` turns result rows (scheduler/reports.py's `grid_results`) into what a plot shows: labels that name
what differs between configs, loss curves, objective-against-key panels. It needs no matplotlib and reads
no database (the caller passes the metrics), so a web page can draw the same numbers. `png` draws them
with matplotlib (Agg) and returns the Figure, so tests read back what was plotted.
"""
