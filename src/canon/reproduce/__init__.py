"""The papers' findings reproduced by canon's recipes (`canon reproduce NAME`), with the
results set beside the papers' numbers: the experiments are data (experiments), their runs
are trained, skipped or resumed (training), analysed (analyses) and reported (report);
`runner.reproduce` does it all. Import the submodule you need: this package imports nothing,
so the command line's `--list` does not wait for torch."""
