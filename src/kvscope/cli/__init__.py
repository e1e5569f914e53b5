"""`kvscope <command>`: one thin module per command over a library call."""
