"""PureJaxRL's PPO on gymnax CartPole-v1, trained through scanfit.fit_steps.

    python examples/ppo_cartpole.py [--quick] [--checkpoint-dir DIR] [--log-dir DIR]

The algorithm and its arithmetic are PureJaxRL's (github luchris429/purejaxrl,
``purejaxrl/ppo.py`` and ``wrappers.py``), written here in the same structure:
``make_train(config)`` returns ``train(rng)``, the whole run as
``lax.scan(_update_step, runner_state, None, NUM_UPDATES)``, where each update
rolls out NUM_ENVS environments for NUM_STEPS steps in-graph, computes GAE and
runs UPDATE_EPOCHS epochs of NUM_MINIBATCHES minibatch updates. ``make_ppo``
exposes the pieces, so the same ``update_step`` runs

- in PureJaxRL's own scan (``jax.jit(make_train(config))(rng)``, the reference);
- through ``scanfit.fit_steps``: compiled chunks, checkpoints with bitwise
  resume, a progress bar, ``log_dir`` with the mean episode return, and an
  in-graph evaluation of the greedy policy that ends the run once its return
  reaches 475 (CartPole-v1's "solved");
- for 4 seeds at once: ``jax.vmap`` of ``scanfit.scan_steps``.

The numbers are PureJaxRL's own, bitwise (``tests/test_steps_examples.py``).
Differences from PureJaxRL's file, none of which changes a number: a four-line
categorical distribution instead of distrax's, the log wrapper's counters
start as float32/int32 arrays (PureJaxRL's Python zeros are promoted to those
by its scan), and gymnax 1.0's ``step`` returns ``terminated`` and
``truncated``, whose OR is PureJaxRL's ``done``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen.initializers import constant, orthogonal
from flax.struct import dataclass
from flax.training.train_state import TrainState

import scanfit

# PureJaxRL's defaults for CartPole-v1 (purejaxrl/ppo.py, __main__).
CONFIG = {
    "LR": 2.5e-4,
    "NUM_ENVS": 4,
    "NUM_STEPS": 128,
    "TOTAL_TIMESTEPS": 5e5,
    "UPDATE_EPOCHS": 4,
    "NUM_MINIBATCHES": 4,
    "GAMMA": 0.99,
    "GAE_LAMBDA": 0.95,
    "CLIP_EPS": 0.2,
    "ENT_COEF": 0.01,
    "VF_COEF": 0.5,
    "MAX_GRAD_NORM": 0.5,
    "ACTIVATION": "tanh",
    "ENV_NAME": "CartPole-v1",
    "ANNEAL_LR": True,
    # Not PureJaxRL's: False leaves the rollout's info out of the minibatch shuffle, which
    # changes no number (the loss never reads it) but, vmapped over seeds on XLA:CPU,
    # saves most of the time: the batched gathers of its leaves dominate there.
    "SHUFFLE_INFO": True,
}
# A few seconds on a CPU: 20 updates of 4 envs x 16 steps.
QUICK = {**CONFIG, "NUM_STEPS": 16, "TOTAL_TIMESTEPS": 4 * 16 * 20}
SOLVED = 475.0  # CartPole-v1's threshold on the mean return
EVAL_ENVS = 8  # greedy evaluation episodes, on fixed reset keys


class Categorical(NamedTuple):
    """A categorical distribution over the last axis of ``logits`` (distrax's, in brief)."""

    logits: jax.Array  # shape=(..., actions)

    def sample(self, seed: jax.Array) -> jax.Array:
        return jax.random.categorical(seed, self.logits)

    def log_prob(self, action: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(self.logits)
        return jnp.take_along_axis(logp, action[..., None].astype(jnp.int32), -1)[..., 0]

    def entropy(self) -> jax.Array:
        logp = jax.nn.log_softmax(self.logits)
        return -jnp.sum(jnp.exp(logp) * logp, -1)


class ActorCritic(nn.Module):
    """PureJaxRL's two 64-unit towers: policy logits and a value."""

    action_dim: int
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        act = nn.relu if self.activation == "relu" else nn.tanh

        def tower(out, scale):
            h = act(nn.Dense(64, kernel_init=orthogonal(np.sqrt(2)), bias_init=constant(0.0))(x))
            h = act(nn.Dense(64, kernel_init=orthogonal(np.sqrt(2)), bias_init=constant(0.0))(h))
            return nn.Dense(out, kernel_init=orthogonal(scale), bias_init=constant(0.0))(h)

        logits = tower(self.action_dim, 0.01)
        value = tower(1, 1.0)
        return Categorical(logits), jnp.squeeze(value, axis=-1)


class Transition(NamedTuple):
    done: jax.Array
    action: jax.Array
    value: jax.Array
    reward: jax.Array
    log_prob: jax.Array
    obs: jax.Array
    info: Any


@dataclass
class LogEnvState:
    env_state: Any
    episode_returns: jax.Array  # float32
    episode_lengths: jax.Array  # int32
    returned_episode_returns: jax.Array  # float32: the return of the last finished episode
    returned_episode_lengths: jax.Array  # int32
    timestep: jax.Array  # int32


class LogWrapper:
    """PureJaxRL's FlattenObservationWrapper + LogWrapper over a gymnax environment."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        return getattr(self._env, name)

    def reset(self, key, params=None):
        obs, env_state = self._env.reset(key, params)
        f, i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
        return jnp.reshape(obs, (-1,)), LogEnvState(env_state, f, i, f, i, i)

    def step(self, key, state, action, params=None):
        obs, env_state, reward, terminated, truncated, info = self._env.step(
            key, state.env_state, action, params
        )
        done = jnp.logical_or(terminated, truncated)  # PureJaxRL's done (gymnax < 1.0)
        new_episode_return = state.episode_returns + reward
        new_episode_length = state.episode_lengths + 1
        state = LogEnvState(
            env_state=env_state,
            episode_returns=new_episode_return * (1 - done),
            episode_lengths=new_episode_length * (1 - done),
            returned_episode_returns=state.returned_episode_returns * (1 - done)
            + new_episode_return * done,
            returned_episode_lengths=state.returned_episode_lengths * (1 - done)
            + new_episode_length * done,
            timestep=state.timestep + 1,
        )
        info = {
            **info,
            "returned_episode_returns": state.returned_episode_returns,
            "returned_episode_lengths": state.returned_episode_lengths,
            "timestep": state.timestep,
            "returned_episode": done,
        }
        return jnp.reshape(obs, (-1,)), state, reward, done, info


class PPO(NamedTuple):
    """The pieces of PureJaxRL's ``train``: ``train(rng)`` is
    ``lax.scan(update_step, init(rng), None, num_updates)``."""

    init: Any  # rng -> runner_state = (train_state, env_state, last_obs, rng)
    update_step: Any  # (runner_state, unused) -> (runner_state, metric: info of the rollout)
    evaluate: Any  # (runner_state, unused) -> {"return": mean greedy return, "score": ...}
    num_updates: int


def make_ppo(config: dict) -> PPO:
    """PureJaxRL's ``make_train``, with ``train``'s init and its scan body kept apart."""
    num_updates = int(config["TOTAL_TIMESTEPS"] // config["NUM_STEPS"] // config["NUM_ENVS"])
    minibatch_size = config["NUM_ENVS"] * config["NUM_STEPS"] // config["NUM_MINIBATCHES"]
    env, env_params = gymnax.make(config["ENV_NAME"])
    env = LogWrapper(env)
    network = ActorCritic(env.action_space(env_params).n, activation=config["ACTIVATION"])

    def linear_schedule(count):
        frac = 1.0 - (count // (config["NUM_MINIBATCHES"] * config["UPDATE_EPOCHS"])) / num_updates
        return config["LR"] * frac

    def init(rng):
        rng, _rng = jax.random.split(rng)
        init_x = jnp.zeros(env.observation_space(env_params).shape)
        network_params = network.init(_rng, init_x)
        lr = linear_schedule if config["ANNEAL_LR"] else config["LR"]
        tx = optax.chain(
            optax.clip_by_global_norm(config["MAX_GRAD_NORM"]), optax.adam(lr, eps=1e-5)
        )
        train_state = TrainState.create(apply_fn=network.apply, params=network_params, tx=tx)
        rng, _rng = jax.random.split(rng)
        reset_rng = jax.random.split(_rng, config["NUM_ENVS"])
        obsv, env_state = jax.vmap(env.reset, in_axes=(0, None))(reset_rng, env_params)
        rng, _rng = jax.random.split(rng)
        return (train_state, env_state, obsv, _rng)

    def _env_step(runner_state, unused):
        train_state, env_state, last_obs, rng = runner_state
        rng, _rng = jax.random.split(rng)
        pi, value = network.apply(train_state.params, last_obs)
        action = pi.sample(seed=_rng)
        log_prob = pi.log_prob(action)
        rng, _rng = jax.random.split(rng)
        rng_step = jax.random.split(_rng, config["NUM_ENVS"])
        obsv, env_state, reward, done, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            rng_step, env_state, action, env_params
        )
        transition = Transition(done, action, value, reward, log_prob, last_obs, info)
        return (train_state, env_state, obsv, rng), transition

    def _calculate_gae(traj_batch, last_val):
        def _get_advantages(gae_and_next_value, transition):
            gae, next_value = gae_and_next_value
            done, value, reward = transition.done, transition.value, transition.reward
            delta = reward + config["GAMMA"] * next_value * (1 - done) - value
            gae = delta + config["GAMMA"] * config["GAE_LAMBDA"] * (1 - done) * gae
            return (gae, value), gae

        _, advantages = jax.lax.scan(
            _get_advantages,
            (jnp.zeros_like(last_val), last_val),
            traj_batch,
            reverse=True,
            unroll=16,
        )
        return advantages, advantages + traj_batch.value

    def _loss_fn(params, traj_batch, gae, targets):
        pi, value = network.apply(params, traj_batch.obs)
        log_prob = pi.log_prob(traj_batch.action)
        # The clipped value loss.
        clip = config["CLIP_EPS"]
        value_pred_clipped = traj_batch.value + (value - traj_batch.value).clip(-clip, clip)
        value_losses = jnp.square(value - targets)
        value_losses_clipped = jnp.square(value_pred_clipped - targets)
        value_loss = 0.5 * jnp.maximum(value_losses, value_losses_clipped).mean()
        # The clipped surrogate objective.
        ratio = jnp.exp(log_prob - traj_batch.log_prob)
        gae = (gae - gae.mean()) / (gae.std() + 1e-8)
        loss_actor1 = ratio * gae
        loss_actor2 = jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * gae
        loss_actor = -jnp.minimum(loss_actor1, loss_actor2)
        loss_actor = loss_actor.mean()
        entropy = pi.entropy().mean()
        total_loss = loss_actor + config["VF_COEF"] * value_loss - config["ENT_COEF"] * entropy
        return total_loss, (value_loss, loss_actor, entropy)

    def _update_minbatch(train_state, batch_info):
        traj_batch, advantages, targets = batch_info
        grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
        total_loss, grads = grad_fn(train_state.params, traj_batch, advantages, targets)
        train_state = train_state.apply_gradients(grads=grads)
        return train_state, total_loss

    def _update_epoch(update_state, unused):
        train_state, traj_batch, advantages, targets, rng = update_state
        rng, _rng = jax.random.split(rng)
        batch_size = minibatch_size * config["NUM_MINIBATCHES"]
        assert batch_size == config["NUM_STEPS"] * config["NUM_ENVS"], (
            "batch size must be equal to number of steps * number of envs"
        )
        permutation = jax.random.permutation(_rng, batch_size)
        shuffled = traj_batch
        if not config.get("SHUFFLE_INFO", True):  # the loss never reads the rollout's info
            shuffled = traj_batch._replace(info=None)
        batch = (shuffled, advantages, targets)
        batch = jax.tree.map(lambda x: x.reshape((batch_size,) + x.shape[2:]), batch)
        shuffled_batch = jax.tree.map(lambda x: jnp.take(x, permutation, axis=0), batch)
        minibatches = jax.tree.map(
            lambda x: jnp.reshape(x, [config["NUM_MINIBATCHES"], -1] + list(x.shape[1:])),
            shuffled_batch,
        )
        train_state, total_loss = jax.lax.scan(_update_minbatch, train_state, minibatches)
        return (train_state, traj_batch, advantages, targets, rng), total_loss

    def update_step(runner_state, unused):
        # Collect trajectories.
        runner_state, traj_batch = jax.lax.scan(_env_step, runner_state, None, config["NUM_STEPS"])
        # Advantages.
        train_state, env_state, last_obs, rng = runner_state
        _, last_val = network.apply(train_state.params, last_obs)
        advantages, targets = _calculate_gae(traj_batch, last_val)
        # Epochs of minibatch updates.
        update_state = (train_state, traj_batch, advantages, targets, rng)
        update_state, loss_info = jax.lax.scan(
            _update_epoch, update_state, None, config["UPDATE_EPOCHS"]
        )
        train_state = update_state[0]
        metric = traj_batch.info
        rng = update_state[-1]
        return (train_state, env_state, last_obs, rng), metric

    def evaluate(runner_state, unused):
        """The greedy policy's mean return over EVAL_ENVS episodes from fixed resets.

        ``score`` grows at every evaluation until the return reaches SOLVED, then
        stays put: with ``best=("score", "max"), patience=1`` the run ends at the
        next evaluation and the best state is the first one that solved it.
        """
        params = runner_state[0].params
        max_steps = env_params.max_steps_in_episode
        keys = jax.random.split(jax.random.PRNGKey(0), (max_steps + 1, EVAL_ENVS))
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(keys[0], env_params)

        def play(carry, step_keys):
            obs, env_state, alive, total = carry
            pi, _ = network.apply(params, obs)
            action = jnp.argmax(pi.logits, axis=-1)
            obs, env_state, reward, done, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                step_keys, env_state, action, env_params
            )
            return (obs, env_state, alive * (1 - done), total + alive * reward), None

        alive = jnp.ones(EVAL_ENVS, jnp.float32)
        carry = (obs, env_state, alive, jnp.zeros(EVAL_ENVS, jnp.float32))
        (_, _, _, total), _ = jax.lax.scan(play, carry, keys[1:])
        ret = total.mean()
        updates = runner_state[0].step // (config["NUM_MINIBATCHES"] * config["UPDATE_EPOCHS"])
        score = jnp.where(ret >= SOLVED, num_updates + 1, updates).astype(jnp.float32)
        return {"return": ret, "score": score}

    return PPO(init, update_step, evaluate, num_updates)


def make_train(config: dict):
    """PureJaxRL's ``make_train``: ``train(rng) -> {"runner_state", "metrics"}``."""
    ppo = make_ppo(config)

    def train(rng):
        runner_state = ppo.init(rng)
        runner_state, metric = jax.lax.scan(ppo.update_step, runner_state, None, ppo.num_updates)
        return {"runner_state": runner_state, "metrics": metric}

    return train


def summary_step(ppo: PPO):
    """``update_step`` as a scanfit step with scalar metrics (PureJaxRL's plotted curve).

    ``return``: the mean over envs and steps of the last finished episode's
    return, ``returned_episode_returns.mean()``, which PureJaxRL plots.
    """

    def step(runner_state, batch):
        runner_state, info = ppo.update_step(runner_state, batch)
        finished = info["returned_episode"]
        return runner_state, {
            "return": info["returned_episode_returns"].mean(),
            "episodes": finished.sum(),
        }

    return step


def train_one(
    config: dict,
    seed: int = 30,
    *,
    chunk_steps: int = 100,
    eval_every: int = 25,
    checkpoint_dir=None,
    log_dir=None,
    progress: bool | None = None,
) -> scanfit.StepsResult:
    """One seed through ``fit_steps``: checkpoints, progress, logs, and a stop once solved.

    The evaluation's ``score`` improves at every evaluation until the greedy
    return reaches SOLVED and never after, so ``patience=1`` ends the run one
    evaluation later, with ``best_state`` the first state that solved it.
    """
    ppo = make_ppo(config)
    return scanfit.fit_steps(
        summary_step(ppo),
        jax.jit(ppo.init)(jax.random.PRNGKey(seed)),
        steps=ppo.num_updates,
        eval_fn=ppo.evaluate,
        eval_every=eval_every,
        best=("score", "max"),
        patience=1,
        chunk_steps=chunk_steps,
        checkpoint_dir=checkpoint_dir,
        log_dir=log_dir,
        progress=progress,
    )


def train_seeds(config: dict, seeds=(0, 1, 2, 3), *, eval_every: int = 25) -> scanfit.StepsResult:
    """Several seeds in one program: ``jax.vmap`` of ``scan_steps`` over stacked runner states.

    Every leaf of the result has a leading axis of ``len(seeds)``; each seed
    stops (its remaining updates skipped) once its own evaluation solved it.
    """
    ppo = make_ppo(config)
    states = jax.vmap(ppo.init)(jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds)))

    def run(state):
        return scanfit.scan_steps(
            summary_step(ppo),
            state,
            steps=ppo.num_updates,
            eval_fn=ppo.evaluate,
            eval_every=eval_every,
            best=("score", "max"),
            patience=1,
        )

    return jax.vmap(run)(states)


def main(quick: bool = False, checkpoint_dir=None, log_dir=None) -> dict:
    config = QUICK if quick else CONFIG
    eval_every, chunk_steps = (5, 10) if quick else (25, 100)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_dir = checkpoint_dir or Path(tmp) / "checkpoints"
        log_dir = log_dir or Path(tmp) / "logs"
        res = train_one(
            config,
            chunk_steps=chunk_steps,
            eval_every=eval_every,
            checkpoint_dir=checkpoint_dir,
            log_dir=log_dir,
            progress=not quick,
        )
        logged = (Path(log_dir) / "metrics.jsonl").read_text().splitlines()
    evals = {k: np.asarray(v) for k, v in res.evals.items()}
    done = evals["step"] >= 0
    seeds = train_seeds(config, eval_every=eval_every)
    seed_returns = np.asarray(seeds.evals["return"])  # (seeds, evaluations), NaN after a stop
    out = {
        "updates": make_ppo(config).num_updates,
        "stopped_at": int(res.stopped_at),
        "best_step": int(res.best_step),
        "eval_steps": evals["step"][done],
        "eval_returns": evals["return"][done],
        "train_return": np.asarray(res.metrics["return"]),
        "logged_lines": len(logged),
        "seed_best_returns": np.nanmax(seed_returns, axis=1),
        "seed_stopped_at": np.asarray(seeds.stopped_at),
    }
    stop = f"stopped at update {out['stopped_at']}" if out["stopped_at"] >= 0 else "ran to the end"
    print(
        f"1 seed, {out['updates']} updates ({stop}): greedy return "
        f"{out['eval_returns'][0]:.0f} -> {out['eval_returns'].max():.0f}, "
        f"best at update {out['best_step']}"
    )
    print(
        f"{len(seed_returns)} seeds in one program: best greedy returns "
        + ", ".join(f"{r:.0f}" for r in out["seed_best_returns"])
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for the tests")
    parser.add_argument("--checkpoint-dir", help="keep checkpoints here (a rerun resumes)")
    parser.add_argument("--log-dir", help="write metrics.jsonl (mean episode return) here")
    args = parser.parse_args()
    main(args.quick, args.checkpoint_dir, args.log_dir)
