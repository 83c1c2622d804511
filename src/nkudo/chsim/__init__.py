"""nkudo-ch-sim: a Cloud Hypervisor simulator for demos and tests (see ``nkudo.chsim.main``).

It speaks the real REST API on the real socket with the real status codes and
state machine, validates bodies against the OpenAPI file and journals every
request, but runs no virtual machine.
"""
