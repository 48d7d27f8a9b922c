"""Generated protobuf and gRPC modules for the kvpeer.v1 wire API.

Do not edit: regenerate with `python proto/generate.py` after changing proto/.
"""
