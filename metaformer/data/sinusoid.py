"""SinusoidFamily: the sinusoid regression tasks of Finn et al. (2017)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from metaformer.data._rng import episode_generator
from metaformer.data.episodes import Episode, EpisodeBatch, IndexedEpisodes

__all__ = ["SinusoidFamily"]


class SinusoidFamily(IndexedEpisodes):
    """Regression episodes y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5].

    ``family[i]`` is task i with K support and Q query points (x [K, 1], y [K, 1], float32), a
    pure function of (seed, i). ``task_params(i)`` gives (amplitude, phase) for plotting the true
    function.
    """

    def __init__(
        self,
        k_shot: int,
        q_query: int,
        seed: int = 0,
        num_episodes: int | None = None,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        for name, value in (("k_shot", k_shot), ("q_query", q_query), ("num_episodes", num_episodes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise TypeError(f"SinusoidFamily: {name} must be an int, got {value!r}")
        if k_shot < 1 or q_query < 0:
            raise ValueError(f"SinusoidFamily: need k_shot >= 1 and q_query >= 0, got {k_shot}, {q_query}")
        if num_episodes is not None and num_episodes < 0:
            raise ValueError(f"SinusoidFamily: num_episodes must be >= 0 or None (unlimited), got {num_episodes}")
        k_shot, q_query = int(k_shot), int(q_query)
        num_episodes = None if num_episodes is None else int(num_episodes)
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo <= hi:
                raise ValueError(f"SinusoidFamily: {name} must be (low, high) with low <= high, got {(lo, hi)}")
        self.k_shot, self.q_query, self.seed, self.num_episodes = k_shot, q_query, int(seed), num_episodes
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def _draw(self, index: int) -> tuple[float, float, Tensor]:
        """Amplitude, phase and the K+Q x values of task ``index`` (float64)."""
        if index < 0:
            raise IndexError(f"SinusoidFamily: episode index must be >= 0, got {index}")
        if self.num_episodes is not None and index >= self.num_episodes:
            raise IndexError(f"episode {index} out of range for num_episodes={self.num_episodes}")
        g = episode_generator(self.seed, index)
        u = torch.rand(2 + self.k_shot + self.q_query, generator=g, dtype=torch.float64)
        amp = self.amplitude[0] + float(u[0]) * (self.amplitude[1] - self.amplitude[0])
        ph = self.phase[0] + float(u[1]) * (self.phase[1] - self.phase[0])
        x = self.x_range[0] + u[2:] * (self.x_range[1] - self.x_range[0])
        return amp, ph, x

    def task_params(self, index: int) -> tuple[float, float]:
        """(amplitude, phase) of task ``index``."""
        amp, ph, _ = self._draw(index)
        return amp, ph

    @staticmethod
    def function(x: Tensor, amplitude: float, phase: float) -> Tensor:
        """The true function A sin(x - phase)."""
        return amplitude * torch.sin(x - phase)

    def __getitem__(self, index: int) -> Episode:
        """Task ``index`` as a regression Episode."""
        amp, ph, x = self._draw(int(index))
        y = self.function(x, amp, ph)
        x32, y32 = x.to(torch.float32).unsqueeze(1), y.to(torch.float32).unsqueeze(1)
        k = self.k_shot
        return Episode(x32[:k], y32[:k], x32[k:], y32[k:], [])

    def batch(self, start: int, num_tasks: int) -> EpisodeBatch:
        """Tasks start .. start+num_tasks-1 collated into one EpisodeBatch."""
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        return EpisodeBatch.collate([self[i] for i in range(start, start + num_tasks)])
