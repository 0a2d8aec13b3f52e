"""Training without a store: both models harvest activations as training goes, into a shuffle buffer.

The buffer holds up to `buffer_tokens` paired rows on the training device. Whenever fewer than half of them are
unread, it is refilled: the next documents run through both models (each only up to the hooked block), their rows
join the unread ones, and the whole buffer is shuffled with the source's own generator. Batches are read from the
front. The documents cycle: after the last one the next epoch starts from the first.

Resume is bit-exact: state_dict holds the document position, the epoch, the generator state and the unread rows
themselves (so a checkpoint is about buffer_tokens x 2 x d x 4 bytes larger, at most), and harvesting is a
deterministic function of the document position. A resumed run therefore draws exactly the batches an
uninterrupted one does, as long as the models' forwards are deterministic on the device (on the CPU they are).
"""

import os
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch

from ..errors import InputError, require_int
from ..models.blocks import hidden_size
from ..models.loading import Devices, ModelSpec, default_model_dtype, load_pair, model_devices, model_name
from .activations import paired_activations, read_documents, tokenize


class OnlineActivations:
    """A batch source (next / state_dict / load_state_dict) that runs a base and a chat model over documents.

    Args:
        base: The base model: a directory, a hub name or a loaded (model, tokenizer) pair.
        chat: The chat model, likewise (its tokenizer and chat template read the documents).
        layer: The block whose output is harvested.
        data: Documents as collect reads them (a JSONL / .txt file or directory, "hf:NAME[:SPLIT]", an iterable).
        batch_size: Rows per batch.
        buffer_tokens: Rows the shuffle buffer holds (>= batch_size; refilled when half is read).
        context_length: Tokens kept per document.
        forward_batch: Documents per forward of the models.
        drop_first: Leading positions of each document not harvested (1: the first position's massive
            activation).
        seed: Seed of the shuffles.
        device: Where the models run: one device, or (base, chat) for models that do not fit together; the buffer
            lives on the chat model's (default: CUDA when available).
        model_dtype: dtype to load the models in (default: bfloat16 on a GPU, float32 on the CPU).

    Raises:
        InputError: Bad sizes, models that do not fit each other, a layer out of range (before any weights
            load), or documents that yield no rows.
    """

    def __init__(
        self,
        base: ModelSpec,
        chat: ModelSpec,
        layer: int,
        data: Union[os.PathLike, str, Iterable[Any]],
        batch_size: int,
        *,
        buffer_tokens: int = 1 << 16,
        context_length: int = 1024,
        forward_batch: int = 8,
        drop_first: int = 1,
        seed: int = 0,
        device: Devices = None,
        model_dtype: Optional[Union[torch.dtype, str]] = None,
    ):
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("context_length", context_length, 1),
            ("forward_batch", forward_batch, 1),
            ("drop_first", drop_first, 0),
        ):
            require_int(name, value, low)
        if not isinstance(buffer_tokens, int) or buffer_tokens < batch_size:
            raise InputError(f"buffer_tokens must be an int >= batch_size = {batch_size}, got {buffer_tokens!r}")
        documents = read_documents(data)
        if not documents:
            raise InputError("data holds no documents")
        base_device, chat_device = model_devices(device)
        (m_base, _), (m_chat, tokenizer) = load_pair(
            base, chat, [layer], dtype=model_dtype or default_model_dtype(chat_device)
        )
        self.device = chat_device  # the buffer's, and the batches'
        self.m_base, self.m_chat = m_base.to(base_device).eval(), m_chat.to(chat_device).eval()
        self.ids = [tokenize(doc, tokenizer, context_length) for doc in documents]
        self.ids = [ids for ids in self.ids if len(ids) > drop_first]
        if not self.ids:
            raise InputError(f"no document is longer than drop_first = {drop_first} tokens")
        self.layer, self.batch_size, self.buffer_tokens = layer, batch_size, buffer_tokens
        self.forward_batch, self.drop_first = forward_batch, drop_first
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.d_model, self.n_models = hidden_size(self.m_base), 2
        self.info = dict(base=model_name(base), chat=model_name(chat), layer=layer, drop_first=drop_first)
        self.generator = torch.Generator().manual_seed(seed)
        self.document, self.epoch = 0, 0
        self.buffer = torch.empty(0, 2, self.d_model, device=self.device)
        self.read = 0
        self._moments = None

    def _harvest(self, rows: int) -> torch.Tensor:
        """At least `rows` new rows, whole forward batches of documents from the current position."""
        parts, count = [], 0
        while count < rows:
            stop = min(self.document + self.forward_batch, len(self.ids))
            batch = [(self.ids[i], self.drop_first) for i in range(self.document, stop)]
            new, _, _ = paired_activations(self.m_base, self.m_chat, batch, self.layer, self.pad)
            parts.append(new.to(self.device))
            count += new.shape[0]
            self.document = stop
            if self.document == len(self.ids):
                self.document, self.epoch = 0, self.epoch + 1
        return torch.cat(parts)

    def _refill(self) -> None:
        unread = self.buffer[self.read :]
        merged = torch.cat([unread, self._harvest(self.buffer_tokens - unread.shape[0])])
        order = torch.randperm(merged.shape[0], generator=self.generator).to(self.device)
        self.buffer, self.read = merged[order], 0
        if self._moments is None:
            x = merged.double()
            self._moments = (x.mean(0).cpu(), x.var(0, unbiased=False).cpu())

    def next(self) -> torch.Tensor:
        """The next batch of rows, refilling the shuffle buffer when half of it is read.

        Returns:
            A batch [batch_size, 2, d], fp32, on the source's device.
        """
        if self.buffer.shape[0] - self.read < max(self.batch_size, self.buffer_tokens // 2):
            self._refill()
        batch = self.buffer[self.read : self.read + self.batch_size]
        self.read += self.batch_size
        return batch

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistics of the first buffer fill, for the crosscoder's input normaliser.

        Returns:
            (mean, variance), each [2, d] float64.
        """
        if self._moments is None:
            self._refill()
        return self._moments

    def state_dict(self) -> dict[str, Any]:
        """The position, for an exact resume.

        Returns:
            The document, epoch, generator state, the unread rows and the normaliser's moments.
        """
        return dict(
            document=self.document,
            epoch=self.epoch,
            generator=self.generator.get_state(),
            unread=self.buffer[self.read :].cpu().clone(),
            moments=self._moments,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position state_dict saved.

        Args:
            state: What state_dict returned.

        Raises:
            InputError: The saved rows do not fit this source (another width), or the position is past the
                documents.
        """
        unread = state["unread"]
        if unread.dim() != 3 or tuple(unread.shape[1:]) != (2, self.d_model):
            raise InputError(
                f"the saved buffer rows are {tuple(unread.shape)}, this source makes [n, 2, {self.d_model}]"
            )
        if not 0 <= int(state["document"]) < len(self.ids):
            raise InputError(f"the saved document position {state['document']} is past the {len(self.ids)} documents")
        self.document, self.epoch = int(state["document"]), int(state["epoch"])
        self.generator.set_state(state["generator"])
        self.buffer, self.read = unread.to(self.device), 0
        self._moments = state.get("moments")
