"""A2A client transport and server adapter for PenguiFlow.

The adapter (``A2AServerAdapter``, ``create_a2a_app``) and the A2A client
transport arrive with the A2A issue; this package exists now so that the
distribution's layout is the one users import from.
"""
