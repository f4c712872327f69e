import bench


def test_the_table_pairs_each_row_with_its_peer_and_adds_the_compiled_sampler_only_where_it_ran():
    ours = {"sample_64": {"graph": {"new_tokens_per_s": 50.0}, "graph_compiled": {"new_tokens_per_s": 60.0},
                          "limit": {"bytes_fraction": 0.17, "flops_fraction": 0.02, "kernels_per_step": 229}},
            "sample_256": {"graph": {"new_tokens_per_s": 120.0}, "limit": {}},
            "ppo_compile1": {"episodes_per_s": 180.0, "update_flops_fraction": 0.27}}
    peers = {"hf_generate_64": {"new_tokens_per_s": 10.0}, "hf_generate_256": {"new_tokens_per_s": 40.0},
             "trl_ppo": {"episodes_per_s": 30.0}}
    rows = {work: (a, b, ratio, lim) for work, a, b, _, ratio, lim in bench.table(ours, peers)}
    assert rows["sampling, batch 64, prompt 64, 128 new tokens (new tokens/s)"] == \
        (50.0, 10.0, 5.0, "memory 17%, compute 2%, 229 kernels/step")
    assert rows["sampling, batch 64, --compile (new tokens/s)"][:3] == (60.0, 10.0, 6.0)
    assert rows["sampling, batch 256, prompt 64, 128 new tokens (new tokens/s)"][2] == 3.0
    assert not any("256, --compile" in w for w in rows)  # not timed: no row
    assert rows["PPO step, 64 x (64 + 64), 4 epochs, --compile (episodes/s)"] == (180.0, 30.0, 6.0,
                                                                                   "update: compute 27%")
    assert len(rows) == 4  # rows without a figure of ours (training, DPO, PPO without --compile) are left out
