raise RuntimeError("this app cannot be imported (on purpose)")
