"""The HTTP side: routes over the unix socket, request and response bodies,
the OpenAPI document, who may call, and read views of the records.

Nothing is imported here, so ``hostagent.api.models`` loads without aiohttp
(the client and hostagentctl use the models alone).
"""
