"""Streaming: the :class:`~kvstream.streaming.streamer.KVStreamer` (scatter/gather, flush/fetch,
stream_out/stream_in at DéjàVuLib's levels), :mod:`~kvstream.streaming.placement` (a pure plan of which
region goes from which rank to which), and :mod:`~kvstream.streaming.session` (a session's manifest and
its replay back into per-layer tensors)."""
