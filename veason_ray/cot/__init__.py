"""CoT data for the CoT-SFT stage (docs/method.md section 6): jobs, teacher prompts, teachers, records, output.

    job = build_cot_job(dataset, record, FrameSpec(num_frames=7))     # frames, keyframe, boxes (jobs.py)
    reply = await teacher.write_cot(job, teacher_instruction(...))  # OpenAITeacher or OfflineTeacher
    record = make_record(job, think_text(reply), teacher.name)       # the ShareGPT line (records.py)

`pipelines/cot.py` (`veason cot`) runs this for every sample with bounded concurrency, resumably. Pure: no ray.
"""
