"""MP-SPDZ itself, for every role: install, find and compile, launch parties, certificates, hosts files, the bind shim."""
