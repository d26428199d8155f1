"""Public data sets by name: a catalogue (`catalogue`), a verified cache under
`$STREAMREC_HOME/datasets` (`cache`, `store`), safe download and extraction (`download`,
`archive`), the `--data PATH|NAME` option type (`resolve`) and `streamrec datasets` (`cli`).
See docs/datasets.md."""
